//! A recorded mission as plain records, without ROS: what `crate::ros::record` decodes from a bag
//! (assignments, the inputs they were decided from, heartbeats, battery health, failure
//! declarations, tokens, bytes per topic), for the audit (`crate::audit`) and the mission report
//! ([`series`]: the [`MissionSeries`] the report's figures are drawn from, the same type the
//! simulator's report uses).
use crate::dataplane::SwarmPlan;
use crate::decision::PlanInputs;
use aerokv_sim::report::{rate, Event, EventKind, MissionSeries, Recovery};
use std::collections::BTreeMap;

/// A recorded mission: its records in the order they were recorded.
#[derive(Debug, Clone, Default)]
pub struct Mission {
    /// Where it came from (the bag directory).
    pub source: String,
    /// Log time of the first and last message, ns since the UNIX epoch.
    pub start_ns: u64,
    pub end_ns: u64,
    pub records: Vec<Timed>,
    /// Every topic of the bag (also those not decoded): messages and CDR bytes.
    pub topics: Vec<TopicBytes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopicBytes {
    pub topic: String,
    pub type_name: String,
    pub messages: u64,
    pub bytes: u64,
}

/// One record, with when the recorder received it and on which topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed {
    pub log_ns: u64,
    pub topic: String,
    pub record: Record,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Assignment(AssignmentRecord),
    PlanInputs(Box<PlanInputs>),
    Heartbeat(HeartbeatRecord),
    Battery(BatteryRecord),
    Failure(FailureRecord),
    Token(TokenRecord),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentRecord {
    pub plan: SwarmPlan,
    pub reason: String,
    pub stamp_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatRecord {
    pub uav: String,
    pub epoch: u64,
    pub sequence: u64,
    pub state: String,
    pub request_id: u64,
    pub pred_snapshot_tokens: u32,
    pub stamp_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatteryRecord {
    pub uav: String,
    pub energy_j: f64,
    pub capacity_j: f64,
    pub state_of_charge: f64,
    pub stamp_ns: u64,
    /// Where the monitor's figures came from: "simulation", "sensor_msgs/BatteryState", ...
    pub source: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailureRecord {
    pub uav: String,
    pub epoch: u64,
    pub reason: String,
    pub silence_s: f64,
    pub stamp_ns: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub request_id: u64,
    pub index: u32,
    pub done: bool,
    pub finish_reason: String,
    /// The token and the text it adds (the answer a live replay compares).
    pub token_id: i32,
    pub text: String,
}

/// What an assignment's reason says happened ("failure of uav2", "retirement of uav3",
/// "restart after failure of uav2"): the event and its UAV; None for plans without one
/// ("initial", "request", "battery or membership change").
pub fn reason_event(reason: &str) -> Option<(EventKind, &str)> {
    let kind = if reason.starts_with("restart after ") {
        EventKind::Restart
    } else if reason.starts_with("failure of ") {
        EventKind::Failover
    } else if reason.starts_with("retirement of ") {
        EventKind::Retirement
    } else {
        return None;
    };
    reason.rsplit(' ').next().filter(|u| !u.is_empty()).map(|u| (kind, u))
}

/// The mission as series over time: seconds since its first plan (what comes before, the
/// swarm starting, is left out), or since its first message when it has no plan.
pub fn series(m: &Mission) -> MissionSeries {
    let first_plan = m.records.iter().find(|r| matches!(r.record, Record::Assignment(_))).map(|r| r.log_ns);
    let origin = first_plan.unwrap_or(m.start_ns);
    let t = |ns: u64| ns.saturating_sub(origin) as f64 / 1e9;
    let mut soc: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut layers: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut events = Vec::new();
    let mut seen_epochs = Vec::new();
    let mut failures: Vec<(f64, &FailureRecord)> = Vec::new();
    let mut replans: Vec<(f64, EventKind, String)> = Vec::new();
    let mut tokens: Vec<(f64, u64)> = Vec::new();
    let mut requests = BTreeMap::<u64, String>::new();
    for r in m.records.iter().filter(|r| r.log_ns >= origin) {
        match &r.record {
            Record::Battery(b) => soc.entry(b.uav.clone()).or_default().push((t(r.log_ns), b.state_of_charge)),
            Record::Assignment(a) if !seen_epochs.contains(&a.plan.epoch) => {
                seen_epochs.push(a.plan.epoch);
                let held: BTreeMap<&str, usize> = a.plan.stages.iter().map(|s| (s.uav.as_str(), s.len)).collect();
                for uav in held.keys() {
                    layers.entry(uav.to_string()).or_default();
                }
                for (uav, v) in layers.iter_mut() {
                    let n = held.get(uav.as_str()).copied().unwrap_or(0) as f64;
                    if v.last().is_none_or(|&(_, y)| y != n) {
                        v.push((t(r.log_ns), n));
                    }
                }
                if let Some((kind, uav)) = reason_event(&a.reason) {
                    let detail = format!("epoch {}, resume at position {}", a.plan.epoch, a.plan.resume_position);
                    events.push(Event { t_s: t(r.log_ns), uav: uav.into(), kind, detail });
                    replans.push((t(r.log_ns), kind, uav.into()));
                }
            }
            // When the watchdog declared it (its stamp; the recorder may get a declaration late,
            // e.g. from the latched history); declarations before the first plan are start-up noise.
            Record::Failure(f) => {
                let at_ns = if f.stamp_ns > 0 { f.stamp_ns } else { r.log_ns };
                if at_ns >= origin {
                    failures.push((t(at_ns), f));
                }
            }
            Record::Token(k) if !k.done => tokens.push((t(r.log_ns), k.request_id)),
            Record::Token(k) => {
                requests.insert(k.request_id, k.finish_reason.clone());
            }
            _ => {}
        }
    }
    let next_token = |after: f64| tokens.iter().map(|&(s, _)| s).find(|&s| s > after);
    // Each re-plan that names a UAV answers its latest declaration before it (a retirement, none).
    let mut answered = vec![false; failures.len()];
    let mut recoveries = Vec::new();
    for (at, kind, uav) in &replans {
        let declared = (*kind != EventKind::Retirement)
            .then(|| failures.iter().enumerate().rfind(|(_, (s, f))| s <= at && &f.uav == uav))
            .flatten();
        if let Some((i, _)) = declared {
            answered[i] = true;
        }
        let from = declared.map_or(*at, |(_, (s, _))| *s);
        if let Some(next) = next_token(from.max(*at)) {
            recoveries.push(Recovery {
                uav: uav.clone(),
                t_s: from,
                detection_s: declared.map_or(0.0, |(_, (_, f))| f.silence_s),
                to_next_token_s: next - from,
                mode: kind.name().into(),
            });
        }
    }
    for ((at, f), answered) in failures.iter().zip(answered) {
        let mut detail = format!("{}, silent {:.2} s, epoch {}", f.reason, f.silence_s, f.epoch);
        if !answered {
            detail.push_str("; no re-plan followed (ignored, or the swarm was idle or stopping)");
        }
        events.push(Event { t_s: *at, uav: f.uav.clone(), kind: EventKind::Failure, detail });
    }
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    // Step latency: the time between two tokens of one request, as they reached the recorder.
    let step_latency_ms: Vec<(f64, f64)> =
        tokens.windows(2).filter(|w| w[0].1 == w[1].1).map(|w| (w[1].0, (w[1].0 - w[0].0) * 1e3)).collect();
    let mut tokens_per_s = Vec::new();
    for id in requests.keys().chain(tokens.iter().map(|t| &t.1)).collect::<std::collections::BTreeSet<_>>() {
        tokens_per_s.extend(rate(&tokens.iter().filter(|t| t.1 == *id).map(|t| t.0).collect::<Vec<_>>()));
    }
    let mut bytes_per_topic: Vec<(String, u64, u64)> =
        m.topics.iter().map(|t| (t.topic.clone(), t.messages, t.bytes)).collect();
    bytes_per_topic.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));

    let count = |k: EventKind| events.iter().filter(|e| e.kind == k).count();
    let mut latencies: Vec<f64> = step_latency_ms.iter().map(|p| p.1).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied();
    let duration_s = t(m.end_ns);
    let mut numbers = vec![
        ("duration".to_string(), format!("{duration_s:.1} s")),
        ("UAVs".to_string(), soc.len().max(layers.len()).to_string()),
        ("plans (epochs)".to_string(), seen_epochs.len().to_string()),
        (
            "requests".to_string(),
            requests.iter().map(|(id, why)| format!("{id} ({why})")).collect::<Vec<_>>().join(", "),
        ),
        ("tokens generated".to_string(), tokens.len().to_string()),
    ];
    for id in requests.keys() {
        let ts: Vec<f64> = tokens.iter().filter(|t| t.1 == *id).map(|t| t.0).collect();
        if let (Some(a), Some(b)) = (ts.first(), ts.last()) {
            if ts.len() > 1 && b > a {
                numbers.push((format!("request {id}: tokens/s"), format!("{:.1}", (ts.len() - 1) as f64 / (b - a))));
            }
        }
    }
    if let (Some(p50), Some(p99)) = (pct(0.5), pct(0.99)) {
        numbers.push(("step latency p50 / p99".into(), format!("{p50:.1} / {p99:.1} ms")));
    }
    numbers.push((
        "failures / failovers / restarts / retirements".into(),
        format!(
            "{} / {} / {} / {}",
            count(EventKind::Failure),
            count(EventKind::Failover),
            count(EventKind::Restart),
            count(EventKind::Retirement)
        ),
    ));
    for r in &recoveries {
        numbers.push((
            format!("{} of {} at {:.1} s", r.mode, r.uav, r.t_s),
            format!(
                "next token {:.2} s after the declaration ({:.2} s of silence before it)",
                r.to_next_token_s, r.detection_s
            ),
        ));
    }
    let total_bytes: u64 = m.topics.iter().map(|t| t.bytes).sum();
    numbers.push(("bytes recorded".into(), format!("{total_bytes} on {} topics", m.topics.len())));
    MissionSeries {
        title: format!("Mission {}", m.source),
        source: format!("bag {}", m.source),
        duration_s,
        time_origin: if first_plan.is_some() { "the first plan" } else { "the first message" }.into(),
        soc,
        layers,
        events,
        tokens_per_s,
        step_latency_ms,
        recoveries,
        bytes_per_topic,
        numbers,
        notes: vec!["Times are the recorder's, on arrival. Bytes are the serialized messages of the recorded topics; \
             activations and KV rows count only when they were recorded (`--record-activations`, `--record-kv-rows`)."
            .into()],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::Stage;

    pub fn plan(epoch: u64, stages: &[(&str, usize, usize)], resume: usize) -> SwarmPlan {
        SwarmPlan {
            epoch,
            num_layers: 30,
            stages: stages.iter().map(|&(u, start, len)| Stage { uav: u.into(), start, len, k: 2, t: 4 }).collect(),
            request_id: 1,
            resume_position: resume,
            replay_from: 0,
            requests: Vec::new(),
        }
    }

    const S: u64 = 1_000_000_000;

    fn at(s: f64, topic: &str, record: Record) -> Timed {
        Timed { log_ns: 100 * S + (s * 1e9) as u64, topic: topic.into(), record }
    }

    fn token(s: f64, index: u32) -> Timed {
        let r = TokenRecord {
            request_id: 1,
            index,
            done: false,
            finish_reason: String::new(),
            token_id: 0,
            text: String::new(),
        };
        at(s, "/aerokv/tokens", Record::Token(r))
    }

    /// Two UAVs, 10 tokens at 10/s, uav2 killed at 0.55 s, declared at 0.75 s, failed over at 0.8 s,
    /// next token at 0.9 s.
    pub fn mission() -> Mission {
        let assign = |s, p: SwarmPlan, reason: &str| {
            at(
                s,
                "/aerokv/assignment",
                Record::Assignment(AssignmentRecord { plan: p, reason: reason.into(), stamp_ns: 0 }),
            )
        };
        let battery = |s, uav: &str, soc: f64| {
            let b = BatteryRecord {
                uav: uav.into(),
                energy_j: soc * 1e3,
                capacity_j: 1e3,
                state_of_charge: soc,
                stamp_ns: 0,
                source: "simulation".into(),
            };
            at(s, &format!("/{uav}/battery"), Record::Battery(b))
        };
        let mut records = vec![
            battery(0.0, "uav1", 0.9),
            battery(0.0, "uav2", 0.5),
            assign(0.05, plan(1, &[("uav1", 0, 15), ("uav2", 15, 15)], 0), "request"),
            // The latched plan again (a second reader): not a new plan.
            assign(0.06, plan(1, &[("uav1", 0, 15), ("uav2", 15, 15)], 0), "request"),
        ];
        records.extend((0..6).map(|i| token(0.1 * (i + 1) as f64, i)));
        let f = FailureRecord {
            uav: "uav2".into(),
            epoch: 1,
            reason: "heartbeat_timeout".into(),
            silence_s: 0.2,
            stamp_ns: 0,
        };
        records.push(at(0.75, "/aerokv/failures", Record::Failure(f.clone())));
        // A declaration made before the first plan, delivered late (latched history): left out.
        let early = FailureRecord { uav: "uav1".into(), epoch: 0, stamp_ns: 100 * S, ..f };
        records.push(at(0.75, "/aerokv/failures", Record::Failure(early)));
        records.push(assign(0.8, plan(2, &[("uav1", 0, 30)], 6), "failure of uav2"));
        records.push(battery(0.85, "uav1", 0.8));
        records.extend((6..10).map(|i| token(0.9 + 0.1 * (i - 6) as f64, i)));
        let done = TokenRecord {
            request_id: 1,
            index: 10,
            done: true,
            finish_reason: "length".into(),
            token_id: 0,
            text: String::new(),
        };
        records.push(at(1.3, "/aerokv/tokens", Record::Token(done)));
        Mission {
            source: "test".into(),
            start_ns: 100 * S,
            end_ns: 100 * S + 13 * S / 10,
            records,
            topics: vec![
                TopicBytes {
                    topic: "/uav1/heartbeat".into(),
                    type_name: "aerokv/msg/Heartbeat".into(),
                    messages: 10,
                    bytes: 2000,
                },
                TopicBytes {
                    topic: "/aerokv/tokens".into(),
                    type_name: "aerokv/msg/TokenChunk".into(),
                    messages: 11,
                    bytes: 600,
                },
            ],
        }
    }

    #[test]
    fn reasons_name_the_event_and_its_uav() {
        assert_eq!(reason_event("failure of uav2"), Some((EventKind::Failover, "uav2")));
        assert_eq!(reason_event("retirement of uav3"), Some((EventKind::Retirement, "uav3")));
        assert_eq!(reason_event("restart after failure of uav10"), Some((EventKind::Restart, "uav10")));
        assert_eq!(reason_event("request"), None);
        assert_eq!(reason_event("battery or membership change"), None);
    }

    #[test]
    fn a_mission_becomes_series() {
        let s = series(&mission());
        // Times count from the first plan (0.05 s): the battery reports before it are left out.
        assert!((s.duration_s - 1.25).abs() < 1e-9 && s.time_origin == "the first plan");
        assert_eq!(s.soc["uav1"].iter().map(|p| p.1).collect::<Vec<_>>(), vec![0.8]);
        // Layers: 15 each, then uav1 holds all 30 and uav2 none (the repeated plan changed nothing).
        assert_eq!(s.layers["uav1"], vec![(0.0, 15.0), (0.75, 30.0)]);
        assert_eq!(s.layers["uav2"], vec![(0.0, 15.0), (0.75, 0.0)]);
        let kinds: Vec<(EventKind, &str)> = s.events.iter().map(|e| (e.kind, e.uav.as_str())).collect();
        assert_eq!(kinds, vec![(EventKind::Failure, "uav2"), (EventKind::Failover, "uav2")]);
        // The failure: 0.2 s of silence, then 0.15 s from the declaration to the next token.
        assert_eq!(s.recoveries.len(), 1);
        let r = &s.recoveries[0];
        assert!(!s.events[0].detail.contains("no re-plan"), "{:?}", s.events[0]);
        assert_eq!((r.uav.as_str(), r.mode.as_str()), ("uav2", "failover"));
        assert!((r.detection_s - 0.2).abs() < 1e-9 && (r.to_next_token_s - 0.15).abs() < 1e-6, "{r:?}");
        // Nine gaps between ten tokens; the stall shows.
        assert_eq!(s.step_latency_ms.len(), 9);
        let worst = s.step_latency_ms.iter().map(|p| p.1).fold(0.0, f64::max);
        assert!((worst - 300.0).abs() < 1e-3, "{worst}");
        assert!(s.tokens_per_s.iter().all(|p| p.1 > 0.0 && p.1 < 11.0));
        assert_eq!(s.bytes_per_topic[0], ("/uav1/heartbeat".to_string(), 10, 2000));
        let numbers: BTreeMap<_, _> = s.numbers.iter().cloned().collect();
        assert_eq!(numbers["tokens generated"], "10");
        assert_eq!(numbers["failures / failovers / restarts / retirements"], "1 / 1 / 0 / 0");
        assert_eq!(numbers["requests"], "1 (length)");
        let md = aerokv_sim::report::summary_markdown(&s);
        assert!(md.contains("| uav2 | failure |") && md.contains("| uav2 | failover |"), "{md}");
    }

    #[test]
    fn an_ignored_declaration_has_no_recovery() {
        let mut m = mission();
        m.records.retain(|r| !matches!(&r.record, Record::Assignment(a) if a.plan.epoch == 2));
        let s = series(&m);
        assert!(s.recoveries.is_empty());
        assert_eq!(s.events.len(), 1);
        assert!(s.events[0].detail.ends_with("no re-plan followed (ignored, or the swarm was idle or stopping)"));
    }
}
