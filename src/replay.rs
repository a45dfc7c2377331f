//! Live replay of a recorded mission (`aerokv bag replay`, docs/bags.md): what a fresh swarm is
//! given again (the kills at the same token, the battery inputs keyed to the token index) and what
//! is compared afterwards (the decisions in order, the answer). Pure: the CLI does the I/O.
use crate::mission::{reason_event, Mission, Record};
use aerokv_sim::report::EventKind;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A recorded failure repeated as `aerokv swarm --kill UAV:AFTER_TOKENS`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kill {
    pub uav: String,
    /// Tokens out (recorded before the failover or restart that followed its failure): the
    /// pipeline makes no token between a UAV's failure and the plan that replaces it.
    pub after_tokens: u32,
}

impl Kill {
    /// The `--kill` argument of `aerokv swarm`.
    pub fn arg(&self) -> String {
        format!("{}:{}", self.uav, self.after_tokens)
    }
}

/// One UAV's battery as it was when `after_tokens` tokens were out (from its recorded
/// `BatteryHealth`): played into the new swarm once it has produced as many.
#[derive(Debug, Clone, PartialEq)]
pub struct BatteryStep {
    pub after_tokens: u32,
    pub uav: String,
    pub state_of_charge: f64,
    pub capacity_j: f64,
}

/// A decision as a replay compares it: everything of an assignment but its epoch number (idle
/// re-plans are timer-driven, so numbers shift) and its request id.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub reason: String,
    pub ring: Vec<String>,
    /// Per UAV in ring order: first layer, layer count, K, T.
    pub stages: Vec<(String, usize, usize, usize, usize)>,
    pub resume_position: usize,
    pub replay_from: usize,
}

impl fmt::Display for Decided {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ring [{}]", self.reason, self.ring.join(" "))?;
        for (uav, start, len, k, t) in &self.stages {
            write!(f, " {uav}: layers {start}+{len} K={k} T={t};")?;
        }
        write!(f, " resume {} replay_from {}", self.resume_position, self.replay_from)
    }
}

/// One generated token of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub index: u32,
    pub token_id: i32,
    pub text: String,
    pub done: bool,
    pub finish_reason: String,
}

/// What a replay repeats and compares, read from one recorded mission.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Script {
    /// UAVs named in the first assignment.
    pub uavs: Vec<String>,
    /// The layer latency the scheduler planned with (its first recorded plan inputs): measured at
    /// its start-up, so a new swarm is given this one instead.
    pub layer_latency_s: Option<f64>,
    pub kills: Vec<Kill>,
    pub battery: Vec<BatteryStep>,
    /// The decisions made up to the answer's last token, in the order they were recorded.
    pub decisions: Vec<Decided>,
    /// Decisions recorded after the answer's last token (idle re-plans; not compared).
    pub after_answer: usize,
    /// The answer's tokens by index (the first one recorded at each index).
    pub answer: Vec<Token>,
    /// UAVs whose battery monitor reported figures from a `sensor_msgs/BatteryState` input before
    /// the answer ended (in a replay: the played inputs; the others simulated their battery).
    pub battery_state_followed: BTreeSet<String>,
}

/// The `source` of a battery report made from a `sensor_msgs/BatteryState`.
pub const FROM_BATTERY_STATE: &str = "sensor_msgs/BatteryState";

/// Reads a mission's script. Records are taken in the order the recorder received them.
pub fn script(m: &Mission) -> Script {
    let mut s = Script::default();
    let mut tokens: BTreeMap<u32, Token> = BTreeMap::new();
    let mut answered = false;
    let mut last_battery: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut epochs = BTreeSet::new();
    for r in &m.records {
        let out = tokens.len() as u32;
        match &r.record {
            Record::Token(t) => {
                tokens.entry(t.index).or_insert_with(|| Token {
                    index: t.index,
                    token_id: t.token_id,
                    text: t.text.clone(),
                    done: t.done,
                    finish_reason: t.finish_reason.clone(),
                });
                answered |= t.done;
            }
            Record::Assignment(a) => {
                // The latched plan received again (a second reader) is not a new decision.
                if !epochs.insert(a.plan.epoch) {
                    continue;
                }
                if s.uavs.is_empty() {
                    s.uavs = a.plan.stages.iter().map(|st| st.uav.clone()).collect();
                }
                if answered {
                    s.after_answer += 1;
                } else {
                    let failed = reason_event(&a.reason)
                        .filter(|(kind, _)| matches!(kind, EventKind::Failover | EventKind::Restart));
                    if let Some((_, uav)) = failed.filter(|(_, uav)| !s.kills.iter().any(|k| k.uav == *uav)) {
                        s.kills.push(Kill { uav: uav.to_string(), after_tokens: out });
                    }
                    s.decisions.push(Decided {
                        reason: a.reason.clone(),
                        ring: a.plan.stages.iter().map(|st| st.uav.clone()).collect(),
                        stages: a.plan.stages.iter().map(|st| (st.uav.clone(), st.start, st.len, st.k, st.t)).collect(),
                        resume_position: a.plan.resume_position,
                        replay_from: a.plan.replay_from,
                    });
                }
            }
            Record::Battery(b) => {
                if !answered && b.source == FROM_BATTERY_STATE {
                    s.battery_state_followed.insert(b.uav.clone());
                }
                let now = (b.state_of_charge, b.capacity_j);
                // Only changes: a replay publishes each UAV's latest step again and again anyway.
                if !answered && last_battery.get(&b.uav) != Some(&now) {
                    last_battery.insert(b.uav.clone(), now);
                    s.battery.push(BatteryStep {
                        after_tokens: out,
                        uav: b.uav.clone(),
                        state_of_charge: b.state_of_charge,
                        capacity_j: b.capacity_j,
                    });
                }
            }
            Record::PlanInputs(i) => {
                if s.layer_latency_s.is_none() {
                    s.layer_latency_s = i.uavs.values().map(|u| u.telemetry.layer_latency_s).next();
                }
            }
            Record::Heartbeat(_) | Record::Failure(_) => {}
        }
    }
    s.answer = tokens.into_values().collect();
    s
}

/// Each UAV's battery step due once `tokens_out` tokens are out (the latest at or before it).
pub fn battery_due(steps: &[BatteryStep], tokens_out: u32) -> BTreeMap<&str, &BatteryStep> {
    let mut due = BTreeMap::new();
    for s in steps.iter().filter(|s| s.after_tokens <= tokens_out) {
        due.insert(s.uav.as_str(), s);
    }
    due
}

/// The first way a replay differs from the recording.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    /// The n-th decision (1-based) differs, or one side has no n-th decision.
    Decision { n: usize, recorded: Option<Decided>, replayed: Option<Decided> },
    /// The answer differs at this token index, or one side has no such token.
    Token { index: u32, recorded: Option<Token>, replayed: Option<Token> },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn side<T: fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "none".to_string(), |v| v.to_string())
        }
        match self {
            Difference::Decision { n, recorded, replayed } => {
                write!(f, "decision {n}:\n  recorded: {}\n  replayed: {}", side(recorded), side(replayed))
            }
            Difference::Token { index, recorded, replayed } => {
                write!(f, "answer token {index}:\n  recorded: {}\n  replayed: {}", side(recorded), side(replayed))
            }
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "id {} {:?}", self.token_id, self.text)?;
        if self.done {
            write!(f, " (done: {})", self.finish_reason)?;
        }
        Ok(())
    }
}

/// Decisions by their order, then the answer token by token; None when both are the same.
pub fn compare(recorded: &Script, replayed: &Script) -> Option<Difference> {
    let n = recorded.decisions.len().max(replayed.decisions.len());
    for i in 0..n {
        let (a, b) = (recorded.decisions.get(i), replayed.decisions.get(i));
        if a != b {
            return Some(Difference::Decision { n: i + 1, recorded: a.cloned(), replayed: b.cloned() });
        }
    }
    let n = recorded.answer.len().max(replayed.answer.len());
    for i in 0..n {
        let (a, b) = (recorded.answer.get(i), replayed.answer.get(i));
        if a != b {
            let index = a.or(b).map_or(i as u32, |t| t.index);
            return Some(Difference::Token { index, recorded: a.cloned(), replayed: b.cloned() });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mission::tests::mission;
    use crate::mission::{BatteryRecord, Timed};

    #[test]
    fn a_mission_gives_its_kill_decisions_and_answer() {
        let s = script(&mission());
        assert_eq!(s.uavs, ["uav1", "uav2"]);
        // uav2 is killed after the tokens recorded before its failover (not uav1, whose
        // declaration came from before the first plan and no plan followed).
        let declared = mission()
            .records
            .iter()
            .position(|r| matches!(&r.record, Record::Assignment(a) if a.reason == "failure of uav2"))
            .expect("the test mission has a failover");
        let before = mission().records[..declared].iter().filter(|r| matches!(r.record, Record::Token(_))).count();
        assert_eq!(s.kills, [Kill { uav: "uav2".into(), after_tokens: before as u32 }]);
        assert_eq!(s.kills[0].arg(), format!("uav2:{before}"));
        assert_eq!(s.decisions.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(), ["request", "failure of uav2"]);
        assert!(s.answer.last().is_some_and(|t| t.done));
        assert!(s.answer.iter().enumerate().all(|(i, t)| t.index == i as u32));
        assert_eq!(compare(&s, &s.clone()), None);
    }

    #[test]
    fn the_first_different_decision_is_named() {
        let rec = script(&mission());
        let mut rep = rec.clone();
        let last = rep.decisions.len() - 1;
        rep.decisions[last].stages[0].3 += 1;
        let Some(Difference::Decision { n, recorded, replayed }) = compare(&rec, &rep) else { panic!() };
        assert_eq!(n, last + 1);
        assert_eq!((recorded.as_ref(), replayed.as_ref()), (rec.decisions.get(last), rep.decisions.get(last)));
        // A missing decision is a difference too, even when the answer is the same.
        rep.decisions = rec.decisions[..last].to_vec();
        let d = compare(&rec, &rep).expect("one decision fewer");
        assert_eq!(d, Difference::Decision { n: last + 1, recorded: rec.decisions.get(last).cloned(), replayed: None });
        assert!(d.to_string().contains("replayed: none"), "{d}");
    }

    #[test]
    fn the_first_different_token_is_named_after_equal_decisions() {
        let rec = script(&mission());
        let mut rep = rec.clone();
        rep.answer[3].token_id += 1;
        rep.answer[5].text.push('x');
        assert!(matches!(compare(&rec, &rep), Some(Difference::Token { index: 3, .. })));
        rep.answer = rec.answer[..4].to_vec();
        assert!(matches!(compare(&rec, &rep), Some(Difference::Token { index: 4, replayed: None, .. })));
    }

    #[test]
    fn epoch_numbers_and_later_replans_are_not_compared() {
        let mut m = mission();
        let mut shifted = m.clone();
        for r in shifted.records.iter_mut() {
            if let Record::Assignment(a) = &mut r.record {
                a.plan.epoch += 5;
                a.plan.request_id += 1;
            }
        }
        assert_eq!(compare(&script(&m), &script(&shifted)), None);
        // A re-plan after the answer is counted, not compared.
        let after = m.records.iter().rev().find(|r| matches!(r.record, Record::Assignment(_))).cloned();
        let mut late = after.expect("an assignment");
        late.log_ns = m.records.last().map_or(0, |r| r.log_ns) + 1;
        if let Record::Assignment(a) = &mut late.record {
            a.plan.epoch += 1;
            a.reason = "battery or membership change".into();
        }
        m.records.push(late);
        let s = script(&m);
        assert_eq!(s.after_answer, script(&mission()).after_answer + 1);
        assert_eq!(compare(&s, &script(&mission())), None);
    }

    #[test]
    fn battery_steps_are_keyed_to_tokens_and_only_changes_count() {
        let mut m = Mission::default();
        let battery = |uav: &str, soc: f64| {
            Record::Battery(BatteryRecord {
                uav: uav.into(),
                energy_j: soc * 100.0,
                capacity_j: 100.0,
                state_of_charge: soc,
                stamp_ns: 0,
                source: "simulation".into(),
            })
        };
        let token = |index| {
            Record::Token(crate::mission::TokenRecord {
                request_id: 1,
                index,
                done: false,
                finish_reason: String::new(),
                token_id: index as i32,
                text: String::new(),
            })
        };
        for record in
            [battery("uav1", 1.0), battery("uav1", 1.0), token(0), token(1), battery("uav1", 0.5), battery("uav2", 0.9)]
        {
            m.records.push(Timed { log_ns: 0, topic: String::new(), record });
        }
        let s = script(&m);
        assert!(s.battery_state_followed.is_empty());
        let mut followed = m.clone();
        if let Some(Record::Battery(b)) = followed.records.last_mut().map(|r| &mut r.record) {
            b.source = FROM_BATTERY_STATE.into();
        }
        assert_eq!(script(&followed).battery_state_followed.into_iter().collect::<Vec<_>>(), ["uav2"]);
        assert_eq!(
            s.battery.iter().map(|b| (b.after_tokens, b.uav.as_str())).collect::<Vec<_>>(),
            [(0, "uav1"), (2, "uav1"), (2, "uav2")]
        );
        let at = |n| {
            battery_due(&s.battery, n).into_iter().map(|(u, b)| (u.to_string(), b.state_of_charge)).collect::<Vec<_>>()
        };
        assert_eq!(at(0), [("uav1".to_string(), 1.0)]);
        assert_eq!(at(1), [("uav1".to_string(), 1.0)]);
        assert_eq!(at(2), [("uav1".to_string(), 0.5), ("uav2".to_string(), 0.9)]);
    }
}
