//! `aerokv bag audit`, without ROS: every assignment of a recorded mission decided again with the
//! scheduler's own function ([`crate::decision::decide`]) from the inputs the scheduler recorded
//! beside it (`PlanInputs`), and those inputs checked against the telemetry, heartbeats and
//! failure declarations recorded before the decision. The first divergence is the answer.
use crate::control::Planned;
use crate::dataplane::SwarmPlan;
use crate::decision::{decide, Decision, PlanInputs};
use crate::mission::{reason_event, AssignmentRecord, BatteryRecord, FailureRecord, HeartbeatRecord, Mission, Record};
use aerokv_sim::report::EventKind;
use std::collections::{BTreeMap, HashMap};

/// One assignment decided again exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub epoch: u64,
    /// "initial", "failover", "retirement".
    pub decision: &'static str,
    pub reason: String,
    /// Seconds since the mission's first message.
    pub at_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditReport {
    /// In epoch order, up to the divergence.
    pub checked: Vec<Checked>,
    /// What could not be checked (a message the recording lost) or looks odd without being wrong.
    pub warnings: Vec<String>,
    /// The first assignment not decided again as recorded.
    pub divergence: Option<Divergence>,
}

impl AuditReport {
    pub fn result(self) -> Result<AuditReport, Divergence> {
        match self.divergence.clone() {
            Some(d) => Err(d),
            None => Ok(self),
        }
    }
}

/// The first assignment that is not decided again as recorded, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("epoch {epoch} (recorded {at_s:.3} s into the mission): {cause}")]
pub struct Divergence {
    pub epoch: u64,
    pub at_s: f64,
    pub cause: Cause,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Cause {
    #[error("no assignment in this bag")]
    NoAssignments,
    #[error("no plan inputs for this assignment in the bag (/aerokv/plan_inputs: a scheduler that does not publish them, or a recording that started late)")]
    NoInputs,
    #[error("recorded twice with different contents ({what})")]
    Rewritten { what: &'static str },
    #[error("recorded {field} = {recorded}, decided again = {decided}")]
    Differs { field: String, recorded: String, decided: String },
    #[error("its inputs cannot be decided again: {0}")]
    Undecidable(String),
    #[error("its inputs disagree with the recording: {0}")]
    Inconsistent(String),
}

/// Audits a mission: what was decided again exactly, then the first divergence if any.
pub fn audit(m: &Mission) -> AuditReport {
    let mut report = AuditReport::default();
    if let Err(d) = audit_into(m, &mut report) {
        report.divergence = Some(d);
    }
    report
}

fn audit_into(m: &Mission, report: &mut AuditReport) -> Result<(), Divergence> {
    let at = |ns: u64| ns.saturating_sub(m.start_ns) as f64 / 1e9;
    let mut assignments: BTreeMap<u64, (u64, &AssignmentRecord)> = BTreeMap::new();
    let mut inputs: BTreeMap<u64, &PlanInputs> = BTreeMap::new();
    let mut batteries: HashMap<(&str, u64), &BatteryRecord> = HashMap::new();
    let mut battery_stamps: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut beats: HashMap<(&str, u64), &HeartbeatRecord> = HashMap::new();
    let mut failures: Vec<&FailureRecord> = Vec::new();
    for r in &m.records {
        match &r.record {
            Record::Assignment(a) => {
                let first = assignments.entry(a.plan.epoch).or_insert((r.log_ns, a));
                if first.1.plan != a.plan || first.1.reason != a.reason {
                    let cause = Cause::Rewritten { what: "assignment" };
                    return Err(Divergence { epoch: a.plan.epoch, at_s: at(r.log_ns), cause });
                }
            }
            Record::PlanInputs(i) => {
                let first = inputs.entry(i.epoch).or_insert(i);
                if *first != &**i {
                    let cause = Cause::Rewritten { what: "plan inputs" };
                    return Err(Divergence { epoch: i.epoch, at_s: at(r.log_ns), cause });
                }
            }
            Record::Battery(b) => {
                batteries.insert((b.uav.as_str(), b.stamp_ns), b);
                battery_stamps.entry(b.uav.as_str()).or_default().push(b.stamp_ns);
            }
            Record::Heartbeat(h) => {
                beats.insert((h.uav.as_str(), h.sequence), h);
            }
            Record::Failure(f) => failures.push(f),
            Record::Token(_) => {}
        }
    }
    let view = Recorded { batteries, battery_stamps, beats, failures };
    if assignments.is_empty() {
        return Err(Divergence { epoch: 0, at_s: 0.0, cause: Cause::NoAssignments });
    }
    for epoch in inputs.keys().filter(|e| !assignments.contains_key(e)) {
        report.warnings.push(format!("plan inputs of epoch {epoch} without its assignment in the bag"));
    }
    let mut decided: BTreeMap<u64, Planned> = BTreeMap::new();
    for (&epoch, &(log_ns, recorded)) in &assignments {
        let fail = |cause| Divergence { epoch, at_s: at(log_ns), cause };
        let i = *inputs.get(&epoch).ok_or_else(|| fail(Cause::NoInputs))?;
        view.check(i, recorded, &decided, &mut report.warnings).map_err(|why| fail(Cause::Inconsistent(why)))?;
        let based_on = match &i.decision {
            Decision::Failover { based_on_epoch, .. } => {
                let p = decided.get(based_on_epoch);
                if p.is_none() {
                    let why = format!("it changes the plan of epoch {based_on_epoch}, which is not in the bag");
                    return Err(fail(Cause::Undecidable(why)));
                }
                p
            }
            Decision::Initial { .. } => None,
        };
        let mut controller = i.params.controller(&i.planning_ids);
        let planned = decide(&mut controller, i, based_on).map_err(|e| fail(Cause::Undecidable(e.to_string())))?;
        if let Some((field, recorded, decided)) = first_difference(&recorded.plan, &planned.plan) {
            return Err(fail(Cause::Differs { field, recorded, decided }));
        }
        report.checked.push(Checked {
            epoch,
            decision: i.decision.name(),
            reason: recorded.reason.clone(),
            at_s: at(log_ns),
        });
        decided.insert(epoch, planned);
    }
    Ok(())
}

/// The recorded messages the inputs are checked against.
struct Recorded<'a> {
    batteries: HashMap<(&'a str, u64), &'a BatteryRecord>,
    battery_stamps: HashMap<&'a str, Vec<u64>>,
    beats: HashMap<(&'a str, u64), &'a HeartbeatRecord>,
    failures: Vec<&'a FailureRecord>,
}

impl Recorded<'_> {
    /// Err with why the inputs disagree with the recording; warnings for what cannot be checked.
    fn check(
        &self,
        i: &PlanInputs,
        recorded: &AssignmentRecord,
        decided: &BTreeMap<u64, Planned>,
        warnings: &mut Vec<String>,
    ) -> Result<(), String> {
        let secs = |ns: u64| ns as f64 / 1e9;
        let epoch = i.epoch;
        // The decision kind and the assignment's reason tell the same story.
        let story = match (&i.decision, reason_event(&recorded.reason)) {
            (Decision::Failover { failed, graceful: false, .. }, Some((EventKind::Failover, u))) => failed == u,
            (Decision::Failover { failed, graceful: true, .. }, Some((EventKind::Retirement, u))) => failed == u,
            (Decision::Initial { .. }, None | Some((EventKind::Restart, _))) => true,
            _ => false,
        };
        if !story {
            return Err(format!("a {} decision published as {:?}", i.decision.name(), recorded.reason));
        }
        for (uav, u) in &i.uavs {
            match self.batteries.get(&(uav.as_str(), u.battery_stamp_ns)) {
                Some(b) => {
                    for (what, held, sent) in
                        [("energy_j", u.telemetry.energy_j, b.energy_j), ("capacity_j", u.telemetry.capacity_j, b.capacity_j)]
                    {
                        if held.to_bits() != sent.to_bits() {
                            return Err(format!(
                                "{uav}'s {what} was {held} in the plan inputs, but the BatteryHealth it came from (stamped {:.6}) says {sent}",
                                secs(b.stamp_ns)
                            ));
                        }
                    }
                    if b.stamp_ns > i.stamp_ns {
                        return Err(format!(
                            "{uav}'s battery health (stamped {:.6}) is from after the decision ({:.6})",
                            secs(b.stamp_ns),
                            secs(i.stamp_ns)
                        ));
                    }
                    // A report sent long before the decision when a newer one had been recorded.
                    let newer = self.battery_stamps.get(uav.as_str()).into_iter().flatten().filter(|&&s| {
                        s > u.battery_stamp_ns && s + (i.params.member_timeout_s * 1e9) as u64 <= i.stamp_ns
                    });
                    if let Some(s) = newer.max() {
                        warnings.push(format!(
                            "epoch {epoch}: {uav}'s battery health was {:.2} s old at the decision although one {:.2} s old had been sent",
                            secs(i.stamp_ns - u.battery_stamp_ns),
                            secs(i.stamp_ns - s)
                        ));
                    }
                }
                None => warnings.push(format!(
                    "epoch {epoch}: {uav}'s battery health stamped {:.6} is not in the bag (recorded best effort, or before the recorder found the topic): not checked",
                    secs(u.battery_stamp_ns)
                )),
            }
            if let Some(h) = u.heartbeat {
                match self.beats.get(&(uav.as_str(), h.sequence)) {
                    Some(b) if b.stamp_ns != h.stamp_ns => {
                        return Err(format!(
                            "{uav}'s heartbeat {} was stamped {:.6} in the plan inputs, {:.6} in the recording",
                            h.sequence,
                            secs(h.stamp_ns),
                            secs(b.stamp_ns)
                        ))
                    }
                    Some(_) => {}
                    None => warnings.push(format!(
                        "epoch {epoch}: {uav}'s heartbeat {} is not in the bag: not checked",
                        h.sequence
                    )),
                }
            }
        }
        match &i.decision {
            Decision::Initial { members } => {
                // Members had been heard within the member timeout (stamps are the senders'; a
                // busy machine delivers late, so twice the timeout).
                let limit = 2.0 * i.params.member_timeout_s;
                for uav in members {
                    let Some(h) = i.uavs.get(uav).and_then(|u| u.heartbeat) else {
                        return Err(format!("{uav} was planned without a heartbeat heard"));
                    };
                    let age = secs(i.stamp_ns.saturating_sub(h.stamp_ns));
                    if age > limit {
                        return Err(format!(
                            "{uav} was planned although its last heartbeat was {age:.2} s old (member timeout {} s)",
                            i.params.member_timeout_s
                        ));
                    }
                }
            }
            Decision::Failover { failed, graceful, based_on_epoch, snapshot } => {
                if !graceful
                    && !self
                        .failures
                        .iter()
                        .any(|f| &f.uav == failed && f.stamp_ns <= i.stamp_ns && f.epoch >= *based_on_epoch)
                {
                    return Err(format!(
                        "failover of {failed} without a failure declaration (epoch >= {based_on_epoch}) recorded before it"
                    ));
                }
                let Some(s) = snapshot else { return Ok(()) };
                let succ = decided.get(based_on_epoch).and_then(|p| p.plan.succ(failed)).map(|s| s.uav.as_str());
                let Some(succ) = succ else { return Ok(()) };
                match self.beats.get(&(succ, s.heartbeat_sequence)) {
                    Some(h)
                        if h.pred_snapshot_tokens as usize != s.tokens
                            || h.epoch != *based_on_epoch
                            || h.request_id != i.request_id =>
                    {
                        return Err(format!(
                            "the snapshot held by {succ} was {} tokens (epoch {based_on_epoch}, request {}) in the plan inputs; its heartbeat {} says {} (epoch {}, request {})",
                            s.tokens, i.request_id, s.heartbeat_sequence, h.pred_snapshot_tokens, h.epoch, h.request_id
                        ));
                    }
                    Some(_) => {}
                    None => warnings.push(format!(
                        "epoch {epoch}: {succ}'s heartbeat {} (the snapshot it held) is not in the bag: not checked",
                        s.heartbeat_sequence
                    )),
                }
            }
        }
        Ok(())
    }
}

/// The first field in which two plans differ: (field, recorded, decided).
pub fn first_difference(recorded: &SwarmPlan, decided: &SwarmPlan) -> Option<(String, String, String)> {
    let d = |f: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
        Some((f.to_string(), format!("{a:?}"), format!("{b:?}")))
    };
    if recorded.epoch != decided.epoch {
        return d("epoch", &recorded.epoch, &decided.epoch);
    }
    if recorded.request_id != decided.request_id {
        return d("request_id", &recorded.request_id, &decided.request_id);
    }
    if recorded.num_layers != decided.num_layers {
        return d("num_layers", &recorded.num_layers, &decided.num_layers);
    }
    let ring = |p: &SwarmPlan| p.stages.iter().map(|s| s.uav.clone()).collect::<Vec<_>>();
    if ring(recorded) != ring(decided) {
        return d("ring", &ring(recorded), &ring(decided));
    }
    for (a, b) in recorded.stages.iter().zip(&decided.stages) {
        let layers = |s: &crate::dataplane::Stage| format!("[{}, {})", s.start, s.start + s.len);
        if (a.start, a.len) != (b.start, b.len) {
            return Some((format!("{} layers", a.uav), layers(a), layers(b)));
        }
        if a.k != b.k {
            return d(&format!("{} K", a.uav), &a.k, &b.k);
        }
        if a.t != b.t {
            return d(&format!("{} T", a.uav), &a.t, &b.t);
        }
    }
    if recorded.resume_position != decided.resume_position {
        return d("resume_position", &recorded.resume_position, &decided.resume_position);
    }
    if recorded.replay_from != decided.replay_from {
        return d("replay_from", &recorded.replay_from, &decided.replay_from);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::tests::{inputs, members};
    use crate::decision::SnapshotHeld;
    use crate::mission::{Timed, TopicBytes};

    const T0: u64 = 1_000;

    fn timed(log_ns: u64, record: Record) -> Timed {
        Timed { log_ns, topic: String::new(), record }
    }

    /// A mission as the scheduler would record it: battery health and heartbeats, an initial
    /// plan over 4 UAVs, uav2 declared failed, its failover with the snapshot uav3 reported.
    fn mission() -> Mission {
        let mut records = Vec::new();
        let initial = inputs(&[2.7e6, 2.7e4, 2.7e6, 2.7e6], Decision::Initial { members: members(4) }, 1);
        for (uav, u) in &initial.uavs {
            let b = BatteryRecord {
                uav: uav.clone(),
                energy_j: u.telemetry.energy_j,
                capacity_j: u.telemetry.capacity_j,
                state_of_charge: 0.5,
                stamp_ns: u.battery_stamp_ns,
                source: "simulation".into(),
            };
            records.push(timed(T0, Record::Battery(b)));
            let h = u.heartbeat.unwrap();
            let hb = HeartbeatRecord {
                uav: uav.clone(),
                epoch: 1,
                sequence: h.sequence,
                state: "ready".into(),
                request_id: 3,
                pred_snapshot_tokens: 32,
                stamp_ns: h.stamp_ns,
            };
            records.push(timed(T0, Record::Heartbeat(hb)));
        }
        let first = decide(&mut initial.params.controller(&initial.planning_ids), &initial, None).unwrap();
        records.push(timed(T0 + 1, Record::PlanInputs(Box::new(initial.clone()))));
        let a = AssignmentRecord { plan: first.plan.clone(), reason: "request".into(), stamp_ns: 2_000 };
        records.push(timed(T0 + 2, Record::Assignment(a)));
        let f = FailureRecord {
            uav: "uav2".into(),
            epoch: 1,
            reason: "heartbeat_timeout".into(),
            silence_s: 0.2,
            stamp_ns: 1_500,
        };
        records.push(timed(T0 + 3, Record::Failure(f)));
        // uav3 (uav2's successor) reported its snapshot in heartbeat 12.
        let succ = first.plan.succ("uav2").unwrap().uav.clone();
        assert_eq!(succ, "uav3");
        let snapshot = Some(SnapshotHeld { tokens: 32, heartbeat_sequence: 12 });
        let mut fo = inputs(
            &[2.7e6, 2.7e4, 2.7e6, 2.7e6],
            Decision::Failover { failed: "uav2".into(), graceful: false, based_on_epoch: 1, snapshot },
            2,
        );
        fo.stamp_ns = 2_500;
        let second = decide(&mut fo.params.controller(&fo.planning_ids), &fo, Some(&first)).unwrap();
        records.push(timed(T0 + 4, Record::PlanInputs(Box::new(fo))));
        let a = AssignmentRecord { plan: second.plan, reason: "failure of uav2".into(), stamp_ns: 2_600 };
        records.push(timed(T0 + 5, Record::Assignment(a)));
        Mission { source: "test".into(), start_ns: T0, end_ns: T0 + 5, records, topics: Vec::<TopicBytes>::new() }
    }

    fn assignment_mut(m: &mut Mission, epoch: u64) -> &mut AssignmentRecord {
        m.records
            .iter_mut()
            .find_map(|r| match &mut r.record {
                Record::Assignment(a) if a.plan.epoch == epoch => Some(a),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn a_faithful_recording_is_decided_again_exactly() {
        let r = audit(&mission()).result().unwrap();
        let got: Vec<(u64, &str)> = r.checked.iter().map(|c| (c.epoch, c.decision)).collect();
        assert_eq!(got, vec![(1, "initial"), (2, "failover")]);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    }

    #[test]
    fn a_changed_assignment_is_the_divergence_named() {
        let mut m = mission();
        let a = assignment_mut(&mut m, 2);
        a.plan.stages[0].k += 1;
        let uav = a.plan.stages[0].uav.clone();
        let e = audit(&m).result().unwrap_err();
        assert_eq!(e.epoch, 2);
        assert!(matches!(&e.cause, Cause::Differs { field, .. } if *field == format!("{uav} K")), "{e}");
        let mut m = mission();
        assignment_mut(&mut m, 2).plan.replay_from = 0;
        let r = audit(&m);
        assert_eq!(r.checked.len(), 1, "epoch 1 was decided again before the divergence");
        let e = r.result().unwrap_err();
        assert_eq!(e.cause, Cause::Differs { field: "replay_from".into(), recorded: "0".into(), decided: "32".into() });
        let mut m = mission();
        assignment_mut(&mut m, 1).plan.stages.swap(0, 1);
        assert!(matches!(audit(&m).result().unwrap_err().cause, Cause::Differs { field, .. } if field == "ring"));
    }

    #[test]
    fn changed_telemetry_is_the_divergence_named() {
        let mut m = mission();
        for r in &mut m.records {
            if let Record::Battery(b) = &mut r.record {
                if b.uav == "uav2" {
                    b.energy_j = 2.7e6;
                }
            }
        }
        let e = audit(&m).result().unwrap_err();
        assert_eq!(e.epoch, 1);
        let Cause::Inconsistent(why) = &e.cause else { panic!("{e}") };
        assert!(why.contains("uav2's energy_j was 27000 in the plan inputs") && why.contains("says 2700000"), "{why}");
        // A heartbeat that says another snapshot.
        let mut m = mission();
        for r in &mut m.records {
            if let Record::Heartbeat(h) = &mut r.record {
                h.pred_snapshot_tokens = 16;
            }
        }
        let e = audit(&m).result().unwrap_err();
        assert!(e.epoch == 2 && e.to_string().contains("heartbeat 12 says 16"), "{e}");
    }

    #[test]
    fn inputs_that_decide_otherwise_are_named() {
        // The inputs themselves changed (uav2's battery full): the first plan differs.
        let mut m = mission();
        for r in &mut m.records {
            match &mut r.record {
                Record::PlanInputs(i) if i.epoch == 1 => i.uavs.get_mut("uav2").unwrap().telemetry.energy_j = 2.7e6,
                Record::Battery(b) if b.uav == "uav2" => b.energy_j = 2.7e6,
                _ => {}
            }
        }
        assert!(matches!(audit(&m).result().unwrap_err(), Divergence { epoch: 1, cause: Cause::Differs { .. }, .. }));
    }

    #[test]
    fn missing_records_are_divergences_or_warnings() {
        // No declaration of uav2's failure.
        let mut m = mission();
        m.records.retain(|r| !matches!(r.record, Record::Failure(_)));
        let e = audit(&m).result().unwrap_err();
        assert!(e.epoch == 2 && e.to_string().contains("without a failure declaration"), "{e}");
        // No inputs for an assignment.
        let mut m = mission();
        m.records.retain(|r| !matches!(&r.record, Record::PlanInputs(i) if i.epoch == 2));
        assert_eq!(audit(&m).result().unwrap_err().cause, Cause::NoInputs);
        // The plan a failover changed is not in the bag.
        let mut m = mission();
        m.records.retain(|r| !matches!(&r.record, Record::Assignment(a) if a.plan.epoch == 1));
        assert!(matches!(audit(&m).result().unwrap_err().cause, Cause::Undecidable(_)));
        // A lost battery report cannot be checked: a warning, not a divergence.
        let mut m = mission();
        m.records.retain(|r| !matches!(&r.record, Record::Battery(b) if b.uav == "uav4"));
        let r = audit(&m).result().unwrap();
        assert!(r.warnings.iter().any(|w| w.contains("uav4's battery health")), "{:?}", r.warnings);
        // A reason that tells another story.
        let mut m = mission();
        assignment_mut(&mut m, 2).reason = "retirement of uav2".into();
        assert!(matches!(audit(&m).result().unwrap_err().cause, Cause::Inconsistent(_)));
        assert_eq!(audit(&Mission::default()).result().unwrap_err().cause, Cause::NoAssignments);
    }
}
