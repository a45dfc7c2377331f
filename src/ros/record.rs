//! A mission on record: `PlanInputs` messages <-> [`PlanInputs`] (checked field by field: a bag
//! is input like any other), and a bag's AeroKV messages decoded into a [`Mission`] (r2r's CDR
//! deserialization, the types this build was made with) for `aerokv bag audit` and `aerokv report`.
use crate::bag::Bag;
use crate::control::{validate_battery_health, Airframe, ModelSize, Telemetry};
use crate::decision::{Decision, HeartbeatSeen, Parameters, PlanInputs, SnapshotHeld, UavInputs};
use crate::mission::{
    AssignmentRecord, BatteryRecord, FailureRecord, HeartbeatRecord, Mission, Record, Timed, TokenRecord, TopicBytes,
};
use aerokv_auth::{Counts, Rejection, Roster, Verifier};
use r2r::aerokv::msg::{self as m, Assignment, BatteryHealth, FailureEvent, Heartbeat, PlanTelemetry, TokenChunk};
use r2r::builtin_interfaces::msg::Time;
use r2r::WrappedTypesupport;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// ns since the UNIX epoch (0 for a time before it).
pub fn stamp_ns(t: &Time) -> u64 {
    if t.sec < 0 {
        return 0;
    }
    t.sec as u64 * 1_000_000_000 + u64::from(t.nanosec)
}

/// `builtin_interfaces/Time` of ns since the UNIX epoch.
pub fn time(ns: u64) -> Time {
    Time { sec: (ns / 1_000_000_000).min(i32::MAX as u64) as i32, nanosec: (ns % 1_000_000_000) as u32 }
}

pub fn plan_inputs_msg(i: &PlanInputs) -> m::PlanInputs {
    let (failed, based_on, snapshot, members) = match &i.decision {
        Decision::Initial { members } => (String::new(), 0, None, members.clone()),
        Decision::Failover { failed, based_on_epoch, snapshot, .. } => {
            (failed.clone(), *based_on_epoch, *snapshot, vec![])
        }
    };
    let p = &i.params;
    m::PlanInputs {
        epoch: i.epoch,
        request_id: i.request_id,
        decision: i.decision.name().into(),
        based_on_epoch: based_on,
        failed_uav: failed,
        members,
        total_tokens: i.total_tokens,
        resume_position: i.resume_position as u32,
        snapshot_known: snapshot.is_some(),
        snapshot_tokens: snapshot.map_or(0, |s| s.tokens as u32),
        snapshot_heartbeat_sequence: snapshot.map_or(0, |s| s.heartbeat_sequence),
        planning_ids: i.planning_ids.clone(),
        telemetry: i
            .uavs
            .iter()
            .map(|(uav, u)| PlanTelemetry {
                uav_id: uav.clone(),
                energy_j: u.telemetry.energy_j,
                capacity_j: u.telemetry.capacity_j,
                layer_latency_s: u.telemetry.layer_latency_s,
                link_bps: u.telemetry.link_bps.unwrap_or(0.0),
                battery_stamp: time(u.battery_stamp_ns),
                heartbeat_sequence: u.heartbeat.map_or(0, |h| h.sequence),
                heartbeat_stamp: time(u.heartbeat.map_or(0, |h| h.stamp_ns)),
            })
            .collect(),
        recovery_deadline_s: p.recovery_deadline_s,
        weight_load_bps: p.weight_load_bps,
        snapshot_periods: p.snapshot_periods.clone(),
        lifetime_target_factor: p.lifetime_target_factor,
        shared_channel: p.shared_channel,
        frame_loss: p.frame_loss,
        flight_power_w: p.airframe.flight_power_w,
        inference_power_w: p.airframe.compute_power_w,
        tx_power_w: p.airframe.tx_power_w,
        link_rate_bps: p.airframe.link_bps,
        memory_budget_bytes: p.airframe.memory_bytes,
        num_layers: p.model.num_layers,
        weight_bytes_per_layer: p.model.weight_bytes_per_layer,
        kv_bytes_per_token_layer: p.model.kv_bytes_per_token_layer,
        member_timeout_s: p.member_timeout_s,
        stamp: time(i.stamp_ns),
        auth: Default::default(),
    }
}

/// Why a `PlanInputs` message was refused.
#[derive(Debug, thiserror::Error)]
#[error("plan inputs of epoch {epoch}: {why}")]
pub struct BadInputs {
    pub epoch: u64,
    pub why: String,
}

/// A `PlanInputs` message, checked: a known decision with what it needs, UAV names that are
/// unique and known to the planning ids, finite figures where the scheduler's parameters must be
/// finite, telemetry that passes the scheduler's own battery check.
pub fn plan_inputs(msg: &m::PlanInputs) -> Result<PlanInputs, BadInputs> {
    let bad = |why: String| BadInputs { epoch: msg.epoch, why };
    let mut ids = BTreeMap::new();
    for (i, n) in msg.planning_ids.iter().enumerate() {
        if n.is_empty() || ids.insert(n.clone(), i).is_some() {
            return Err(bad(format!("planning id {i} ({n:?}) is empty or repeated")));
        }
    }
    let known = |u: &str, what: &str| {
        if ids.contains_key(u) {
            Ok(())
        } else {
            Err(bad(format!("{what} {u:?} has no planning id")))
        }
    };
    let decision = match msg.decision.as_str() {
        "initial" => {
            if msg.members.is_empty() {
                return Err(bad("an initial decision over no members".into()));
            }
            for u in &msg.members {
                known(u, "member")?;
            }
            Decision::Initial { members: msg.members.clone() }
        }
        d @ ("failover" | "retirement") => {
            known(&msg.failed_uav, "failed UAV")?;
            if msg.based_on_epoch == 0 || msg.based_on_epoch >= msg.epoch {
                return Err(bad(format!("based on epoch {}, not an earlier one", msg.based_on_epoch)));
            }
            let snapshot = msg.snapshot_known.then_some(SnapshotHeld {
                tokens: msg.snapshot_tokens as usize,
                heartbeat_sequence: msg.snapshot_heartbeat_sequence,
            });
            Decision::Failover {
                failed: msg.failed_uav.clone(),
                graceful: d == "retirement",
                based_on_epoch: msg.based_on_epoch,
                snapshot,
            }
        }
        other => return Err(bad(format!("unknown decision {other:?}"))),
    };
    let mut uavs = BTreeMap::new();
    for t in &msg.telemetry {
        let fields = crate::control::BatteryHealthFields {
            uav_id: &t.uav_id,
            energy_j: t.energy_j,
            capacity_j: t.capacity_j,
            state_of_charge: 0.0,
            power_w: 0.0,
            expected_remaining_tokens: 0.0,
        };
        validate_battery_health(&fields, &t.uav_id).map_err(|e| bad(format!("{}: {e}", t.uav_id)))?;
        if !(t.layer_latency_s.is_finite() && t.layer_latency_s > 0.0) {
            return Err(bad(format!("{}: layer latency {} s", t.uav_id, t.layer_latency_s)));
        }
        if !(t.link_bps.is_finite() && (0.0..=crate::linkrate::MAX_GOODPUT_BPS).contains(&t.link_bps)) {
            return Err(bad(format!("{}: link rate {} bit/s", t.uav_id, t.link_bps)));
        }
        let heartbeat = (t.heartbeat_sequence > 0 || stamp_ns(&t.heartbeat_stamp) > 0)
            .then(|| HeartbeatSeen { sequence: t.heartbeat_sequence, stamp_ns: stamp_ns(&t.heartbeat_stamp) });
        let u = UavInputs {
            telemetry: Telemetry {
                energy_j: t.energy_j,
                capacity_j: t.capacity_j,
                layer_latency_s: t.layer_latency_s,
                link_bps: (t.link_bps > 0.0).then_some(t.link_bps),
            },
            battery_stamp_ns: stamp_ns(&t.battery_stamp),
            heartbeat,
        };
        if uavs.insert(t.uav_id.clone(), u).is_some() {
            return Err(bad(format!("telemetry of {} twice", t.uav_id)));
        }
    }
    for (name, v) in [
        ("recovery_deadline_s", msg.recovery_deadline_s),
        ("weight_load_bps", msg.weight_load_bps),
        ("link_rate_bps", msg.link_rate_bps),
        ("memory_budget_bytes", msg.memory_budget_bytes),
        ("weight_bytes_per_layer", msg.weight_bytes_per_layer),
        ("kv_bytes_per_token_layer", msg.kv_bytes_per_token_layer),
        ("member_timeout_s", msg.member_timeout_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(bad(format!("{name} must be positive, not {v}")));
        }
    }
    for (name, v) in [
        ("flight_power_w", msg.flight_power_w),
        ("inference_power_w", msg.inference_power_w),
        ("tx_power_w", msg.tx_power_w),
        ("lifetime_target_factor", msg.lifetime_target_factor),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(bad(format!("{name} must be >= 0, not {v}")));
        }
    }
    if !(0.0..1.0).contains(&msg.frame_loss) {
        return Err(bad(format!("frame_loss {} is not in [0, 1)", msg.frame_loss)));
    }
    if msg.snapshot_periods.is_empty() || msg.snapshot_periods.contains(&0) || msg.snapshot_periods.len() > 1024 {
        return Err(bad("snapshot_periods must list periods >= 1".into()));
    }
    if msg.num_layers == 0 || msg.num_layers > 100_000 {
        return Err(bad(format!("num_layers {}", msg.num_layers)));
    }
    Ok(PlanInputs {
        epoch: msg.epoch,
        request_id: msg.request_id,
        decision,
        total_tokens: msg.total_tokens,
        resume_position: msg.resume_position as usize,
        planning_ids: msg.planning_ids.clone(),
        uavs,
        params: Parameters {
            recovery_deadline_s: msg.recovery_deadline_s,
            weight_load_bps: msg.weight_load_bps,
            snapshot_periods: msg.snapshot_periods.clone(),
            lifetime_target_factor: msg.lifetime_target_factor,
            shared_channel: msg.shared_channel,
            frame_loss: msg.frame_loss,
            airframe: Airframe {
                flight_power_w: msg.flight_power_w,
                compute_power_w: msg.inference_power_w,
                tx_power_w: msg.tx_power_w,
                link_bps: msg.link_rate_bps,
                memory_bytes: msg.memory_budget_bytes,
            },
            model: ModelSize {
                num_layers: msg.num_layers,
                weight_bytes_per_layer: msg.weight_bytes_per_layer,
                kv_bytes_per_token_layer: msg.kv_bytes_per_token_layer,
            },
            member_timeout_s: msg.member_timeout_s,
        },
        stamp_ns: stamp_ns(&msg.stamp),
    })
}

fn decode<T: WrappedTypesupport>(data: &[u8]) -> Result<T, String> {
    T::from_serialized_bytes(data).map_err(|e| format!("undecodable: {e}"))
}

/// One message of the bag as a record (None: a type the audit and the report do not use).
fn record(type_name: &str, data: &[u8]) -> Result<Option<Record>, String> {
    Ok(Some(match type_name {
        "aerokv/msg/Assignment" => {
            let a: Assignment = decode(data)?;
            let plan = crate::ros::convert::plan(&a);
            Record::Assignment(AssignmentRecord { plan, reason: a.reason, stamp_ns: stamp_ns(&a.stamp) })
        }
        "aerokv/msg/PlanInputs" => {
            Record::PlanInputs(Box::new(plan_inputs(&decode::<m::PlanInputs>(data)?).map_err(|e| e.to_string())?))
        }
        "aerokv/msg/Heartbeat" => {
            let h: Heartbeat = decode(data)?;
            Record::Heartbeat(HeartbeatRecord {
                uav: h.uav_id,
                epoch: h.epoch,
                sequence: h.sequence,
                state: h.state,
                request_id: h.request_id,
                pred_snapshot_tokens: h.pred_snapshot_tokens,
                stamp_ns: stamp_ns(&h.stamp),
            })
        }
        "aerokv/msg/BatteryHealth" => {
            let b: BatteryHealth = decode(data)?;
            Record::Battery(BatteryRecord {
                uav: b.uav_id,
                energy_j: b.energy_j,
                capacity_j: b.capacity_j,
                state_of_charge: f64::from(b.state_of_charge),
                stamp_ns: stamp_ns(&b.stamp),
                source: b.source,
            })
        }
        "aerokv/msg/FailureEvent" => {
            let f: FailureEvent = decode(data)?;
            Record::Failure(FailureRecord {
                uav: f.uav_id,
                epoch: f.epoch,
                reason: f.reason,
                silence_s: f.silence_s,
                stamp_ns: stamp_ns(&f.stamp),
            })
        }
        "aerokv/msg/TokenChunk" => {
            let t: TokenChunk = decode(data)?;
            Record::Token(TokenRecord {
                request_id: t.request_id,
                index: t.index,
                done: t.done,
                finish_reason: t.finish_reason,
                token_id: t.token_id,
                text: t.text,
            })
        }
        _ => return Ok(None),
    }))
}

/// A recorded message that did not verify (`aerokv bag audit --keystore`).
#[derive(Debug, Clone, PartialEq)]
pub struct NotAuthentic {
    pub file: PathBuf,
    /// The byte offset of its record (of its chunk, for a message in a chunk).
    pub offset: u64,
    pub topic: String,
    pub log_ns: u64,
    pub sender: String,
    pub why: Rejection,
}

impl std::fmt::Display for NotAuthentic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sender = if self.sender.is_empty() { "no sender".to_string() } else { format!("sender {:?}", self.sender) };
        write!(
            f,
            "{}: byte offset {}: {} message recorded at {:.6} ({sender}): {}",
            self.file.display(),
            self.offset,
            self.topic,
            self.log_ns as f64 / 1e9,
            self.why.name()
        )
    }
}

/// What checking every signed message of a bag against a roster found.
#[derive(Debug, Default)]
pub struct Authenticity {
    /// Verified and refused, per reason (a message recorded twice, byte for byte, counts once).
    pub counts: Counts,
    /// Messages recorded twice byte for byte (a latched message delivered again): not checked again.
    pub duplicates: u64,
    /// Every refused message, in file order.
    pub refused: Vec<NotAuthentic>,
}

/// Reads a whole bag (checked against its metadata first: a truncated or corrupt file is named
/// with the offset) and decodes its AeroKV messages.
pub fn read_mission(dir: &Path) -> anyhow::Result<Mission> {
    Ok(read_mission_verified(dir, None)?.0)
}

/// [`read_mission`], and with a roster every signed message verified as a node would on receipt.
pub fn read_mission_verified(dir: &Path, roster: Option<Roster>) -> anyhow::Result<(Mission, Option<Authenticity>)> {
    let bag = Bag::open(dir)?;
    let contents = bag.check()?;
    let mut mission = Mission {
        source: dir.display().to_string(),
        start_ns: contents.first.unwrap_or(0),
        end_ns: contents.last.unwrap_or(0),
        ..Default::default()
    };
    let mut verifier = roster.map(Verifier::new);
    let mut authenticity = Authenticity::default();
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut topics: BTreeMap<String, TopicBytes> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for msg in bag.messages() {
        let msg = msg?;
        let (topic, type_name) = (&msg.channel.topic, &msg.channel.type_name);
        let t = topics.entry(topic.clone()).or_insert_with(|| TopicBytes {
            topic: topic.clone(),
            type_name: type_name.clone(),
            messages: 0,
            bytes: 0,
        });
        t.messages += 1;
        t.bytes += msg.data.len() as u64;
        let n = counts.entry(topic.clone()).or_default();
        *n += 1;
        if let Some(v) = verifier.as_mut() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            msg.data.hash(&mut h);
            if !seen.insert((topic.clone(), h.finish())) {
                authenticity.duplicates += 1;
            } else if let Some(Err(why)) = crate::ros::auth::verify_recorded(v, topic, type_name, &msg.data) {
                authenticity.refused.push(NotAuthentic {
                    file: msg.file.to_path_buf(),
                    offset: msg.offset,
                    topic: topic.clone(),
                    log_ns: msg.log_time,
                    sender: sender(type_name, &msg.data),
                    why,
                });
            }
        }
        match record(type_name, &msg.data) {
            Ok(Some(record)) => mission.records.push(Timed { log_ns: msg.log_time, topic: topic.clone(), record }),
            Ok(None) => {}
            Err(why) => anyhow::bail!(
                "{}: corrupt at byte offset {}: message {} on {topic} ({type_name}, recorded at {} ns): {why}",
                msg.file.display(),
                msg.offset,
                *n,
                msg.log_time
            ),
        }
    }
    mission.records.sort_by_key(|r| r.log_ns);
    mission.topics = topics.into_values().collect();
    let authenticity = verifier.map(|v| Authenticity { counts: v.counts(), ..authenticity });
    Ok((mission, authenticity))
}

/// The sender a signed message claims (for the report of one that did not verify).
fn sender(type_name: &str, data: &[u8]) -> String {
    fn of<T: WrappedTypesupport>(data: &[u8], auth: fn(T) -> r2r::aerokv::msg::Auth) -> String {
        decode::<T>(data).map(|m| auth(m).sender).unwrap_or_default()
    }
    match type_name {
        "aerokv/msg/Assignment" => of::<Assignment>(data, |m| m.auth),
        "aerokv/msg/FailureEvent" => of::<FailureEvent>(data, |m| m.auth),
        "aerokv/msg/TokenChunk" => of::<TokenChunk>(data, |m| m.auth),
        "aerokv/msg/PlanInputs" => of::<m::PlanInputs>(data, |m| m.auth),
        "aerokv/msg/Heartbeat" => of::<Heartbeat>(data, |m| m.auth),
        "aerokv/msg/BatteryHealth" => of::<BatteryHealth>(data, |m| m.auth),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::tests::{inputs, members};

    #[test]
    fn plan_inputs_survive_the_message_and_cdr() {
        for i in [
            inputs(&[2.7e6, 1e6, 5e5], Decision::Initial { members: members(3) }, 1),
            inputs(
                &[2.7e6, 1e6, 5e5],
                Decision::Failover {
                    failed: "uav2".into(),
                    graceful: true,
                    based_on_epoch: 1,
                    snapshot: Some(SnapshotHeld { tokens: 7, heartbeat_sequence: 9 }),
                },
                2,
            ),
        ] {
            let msg = plan_inputs_msg(&i);
            let bytes = msg.to_serialized_bytes().unwrap();
            let back: m::PlanInputs = decode(&bytes).unwrap();
            assert_eq!(plan_inputs(&back).unwrap(), i);
        }
    }

    #[test]
    fn hostile_plan_inputs_are_refused() {
        let good = plan_inputs_msg(&inputs(&[2.7e6, 1e6], Decision::Initial { members: members(2) }, 1));
        let refused = |f: fn(&mut m::PlanInputs)| {
            let mut msg = good.clone();
            f(&mut msg);
            plan_inputs(&msg).unwrap_err().to_string()
        };
        assert!(refused(|m| m.decision = "guess".into()).contains("unknown decision"));
        assert!(refused(|m| m.members.clear()).contains("no members"));
        assert!(refused(|m| m.members.push("uav9".into())).contains("\"uav9\" has no planning id"));
        assert!(refused(|m| m.planning_ids.push("uav1".into())).contains("repeated"));
        assert!(refused(|m| m.telemetry[0].energy_j = f64::NAN).contains("energy_j"));
        assert!(refused(|m| m.telemetry[1].energy_j = 1e7).contains("exceeds the capacity"));
        assert!(refused(|m| m.telemetry.push(m.telemetry[0].clone())).contains("twice"));
        assert!(refused(|m| m.telemetry[0].layer_latency_s = 0.0).contains("layer latency"));
        assert!(refused(|m| m.link_rate_bps = f64::INFINITY).contains("link_rate_bps"));
        assert!(refused(|m| m.frame_loss = 1.0).contains("frame_loss"));
        assert!(refused(|m| m.snapshot_periods = vec![0]).contains("snapshot_periods"));
        assert!(refused(|m| m.num_layers = 0).contains("num_layers"));
        assert!(refused(|m| {
            m.decision = "failover".into();
            m.failed_uav = "uav1".into();
            m.based_on_epoch = 1;
        })
        .contains("not an earlier one"));
    }
}
