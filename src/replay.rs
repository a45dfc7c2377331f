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
    /// When the recorder received it (the recorded mission's clock, ns since the UNIX epoch).
    pub log_ns: u64,
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
    /// Decisions after the answer (idle re-plans; not compared): recorded after its last chunk,
    /// or plans for no request recorded after its first token.
    pub after_answer: usize,
    /// The answer's tokens by index (the first one recorded at each index).
    pub answer: Vec<Token>,
    /// When each of the answer's tokens was recorded (ns since the UNIX epoch), by index.
    pub token_ns: Vec<u64>,
    /// When the recording started (the first message, ns since the UNIX epoch).
    pub start_ns: u64,
    /// UAVs whose battery monitor reported figures from a `sensor_msgs/BatteryState` input before
    /// the answer ended (in a replay: the played inputs; the others simulated their battery).
    pub battery_state_followed: BTreeSet<String>,
}

/// The `source` of a battery report made from a `sensor_msgs/BatteryState`.
pub const FROM_BATTERY_STATE: &str = "sensor_msgs/BatteryState";

/// Reads a mission's script. Records are taken in the order the recorder received them.
pub fn script(m: &Mission) -> Script {
    let mut s = Script { start_ns: m.start_ns, ..Script::default() };
    let mut tokens: BTreeMap<u32, (u64, Token)> = BTreeMap::new();
    let mut answered = false;
    let mut last_battery: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut epochs = BTreeSet::new();
    for r in &m.records {
        let out = tokens.len() as u32;
        match &r.record {
            Record::Token(t) => {
                tokens.entry(t.index).or_insert_with(|| {
                    let token = Token {
                        index: t.index,
                        token_id: t.token_id,
                        text: t.text.clone(),
                        done: t.done,
                        finish_reason: t.finish_reason.clone(),
                    };
                    (r.log_ns, token)
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
                // A plan for no request once the answer has begun is an idle re-plan after it
                // (recorded before the answer's last chunk when their topics race).
                if answered || (!tokens.is_empty() && a.plan.request_id == 0) {
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
                        log_ns: r.log_ns,
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
    (s.token_ns, s.answer) = tokens.into_values().unzip();
    s
}

/// Each UAV's battery step due (the latest one) once `tokens_out` tokens are out and the
/// replay's clock, mapped back onto the recorded mission's ([`Pacer::recorded_now_ns`]), reads
/// `recorded_now_ns`: a step recorded before the first token at once (the plans made before the
/// answer are made from the latest of them); a later one at its recorded time, and at the latest
/// once the token after it is out.
pub fn battery_due(steps: &[BatteryStep], tokens_out: u32, recorded_now_ns: u64) -> BTreeMap<&str, &BatteryStep> {
    let mut due = BTreeMap::new();
    let is_due = |s: &BatteryStep| {
        s.after_tokens == 0
            || s.after_tokens < tokens_out
            || (s.after_tokens == tokens_out && s.log_ns <= recorded_now_ns)
    };
    for s in steps.iter().filter(|s| is_due(s)) {
        due.insert(s.uav.as_str(), s);
    }
    due
}

/// The simulated time a live replay publishes on `/clock` (every node of the new swarm runs with
/// `use_sim_time`). It starts at the recorded mission's start and runs at the wall clock's rate.
/// The first token fixes the offset between the two clocks (the new swarm's start-up takes
/// another time); from then on the clock never passes the recorded time of the next token to
/// come, shifted by that offset: between two tokens the new swarm's timers, heartbeats, battery
/// reports and timeouts see at most the time the recorded swarm had between them. Time never
/// goes back and never jumps (a jump would look like silence to the watchdog).
#[derive(Debug, Clone)]
pub struct Pacer {
    token_ns: Vec<u64>,
    sim_ns: u64,
    offset_ns: Option<i64>,
    /// The token a hold was given up for ([`Pacer::release`]) and its limit: no limit until it
    /// is out.
    released: Option<(u32, u64)>,
    /// The most the clock was past a token's (shifted) recorded time when that token came out.
    ahead_ns: u64,
}

/// What [`Pacer::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// The clock moved on by the wall time passed.
    Running,
    /// The clock stands at the recorded time of token `next` (not out yet).
    Held { next: u32 },
}

impl Pacer {
    pub fn new(start_ns: u64, token_ns: Vec<u64>) -> Self {
        Pacer { token_ns, sim_ns: start_ns, offset_ns: None, released: None, ahead_ns: 0 }
    }

    /// The replay's simulated time (ns since the UNIX epoch).
    pub fn now_ns(&self) -> u64 {
        self.sim_ns
    }

    /// The most the clock was past a token's (shifted) recorded time when the token came out
    /// (only after a hold was given up).
    pub fn ahead_ns(&self) -> u64 {
        self.ahead_ns
    }

    /// How far the recorded times are shifted (replay minus recording; known from the first
    /// token on).
    pub fn offset_ns(&self) -> Option<i64> {
        self.offset_ns
    }

    /// The replay's time on the recorded mission's clock.
    pub fn recorded_now_ns(&self) -> u64 {
        shift(self.sim_ns, -self.offset_ns.unwrap_or(0))
    }

    /// Recorded time `ns` on the replay's clock.
    pub fn replay_time_ns(&self, recorded_ns: u64) -> u64 {
        shift(recorded_ns, self.offset_ns.unwrap_or(0))
    }

    /// `wall` has passed since the last call and tokens `0..arrived` are out (the final `done`
    /// chunk included): moves the clock on, up to the limit.
    pub fn advance(&mut self, wall: std::time::Duration, arrived: u32) -> Pace {
        if arrived >= 1 && self.offset_ns.is_none() {
            let offset = self.token_ns.first().map_or(0, |&t0| self.sim_ns as i128 - t0 as i128);
            self.offset_ns = Some(offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64);
        }
        if let Some((_, limit)) = self.released.filter(|(next, _)| arrived > *next) {
            self.ahead_ns = self.ahead_ns.max(self.sim_ns.saturating_sub(limit));
            self.released = None;
        }
        let want = self.sim_ns.saturating_add(u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX));
        match self.limit(arrived) {
            Some(limit) if want >= limit => {
                self.sim_ns = self.sim_ns.max(limit);
                Pace::Held { next: arrived }
            }
            _ => {
                self.sim_ns = want;
                Pace::Running
            }
        }
    }

    fn limit(&self, arrived: u32) -> Option<u64> {
        if arrived == 0 || self.released.is_some_and(|(next, _)| next == arrived) {
            return None;
        }
        self.token_ns.get(arrived as usize).map(|&t| self.replay_time_ns(t))
    }

    /// Lets the clock run past the recorded time of the next token (a swarm that needs more of its
    /// own time for it than the recording took); the limit is back with the token after.
    pub fn release(&mut self, arrived: u32) {
        if let Some(limit) = self.limit(arrived) {
            self.released = Some((arrived, limit));
        }
    }
}

/// A played battery input the new swarm did not hear in time: a report of `uav`'s battery monitor
/// stamped after the clock started (`after_ns`, simulated time) that still came from its
/// simulation. The player publishes a UAV's first input before the clock moves and the monitor
/// reports at its next tick, so every report after the first one must be from the input.
#[derive(Debug, Clone, PartialEq)]
pub struct Unheard {
    pub uav: String,
    pub stamp_ns: u64,
    pub source: String,
}

/// Every [`Unheard`] report of the `played` UAVs in the replayed mission `m`.
pub fn unheard(m: &Mission, played: &BTreeSet<&str>, after_ns: u64) -> Vec<Unheard> {
    m.records
        .iter()
        .filter_map(|r| match &r.record {
            Record::Battery(b)
                if played.contains(b.uav.as_str()) && b.stamp_ns > after_ns && b.source != FROM_BATTERY_STATE =>
            {
                Some(Unheard { uav: b.uav.clone(), stamp_ns: b.stamp_ns, source: b.source.clone() })
            }
            _ => None,
        })
        .collect()
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

fn shift(ns: u64, by: i64) -> u64 {
    if by >= 0 {
        ns.saturating_add(by as u64)
    } else {
        ns.saturating_sub(by.unsigned_abs())
    }
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
        // ... also when it is recorded before the answer's last chunk (for no request).
        let done = m.records.iter().position(|r| matches!(&r.record, Record::Token(t) if t.done)).expect("done");
        let mut raced = m.records.pop().expect("the re-plan");
        if let Record::Assignment(a) = &mut raced.record {
            a.plan.request_id = 0;
        }
        m.records.insert(done, raced);
        assert_eq!(script(&m).after_answer, s.after_answer);
        assert_eq!(compare(&script(&m), &script(&mission())), None);
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
        let records = [
            battery("uav1", 1.0),
            battery("uav1", 1.0),
            token(0),
            token(1),
            battery("uav1", 0.5),
            battery("uav2", 0.9),
        ];
        for (i, record) in records.into_iter().enumerate() {
            m.records.push(Timed { log_ns: 10 * i as u64, topic: String::new(), record });
        }
        let s = script(&m);
        assert!(s.battery_state_followed.is_empty());
        let mut followed = m.clone();
        if let Some(Record::Battery(b)) = followed.records.last_mut().map(|r| &mut r.record) {
            b.source = FROM_BATTERY_STATE.into();
        }
        assert_eq!(script(&followed).battery_state_followed.into_iter().collect::<Vec<_>>(), ["uav2"]);
        // uav1's reports stamped after the clock started still came from its simulation.
        let played = BTreeSet::from(["uav1", "uav2"]);
        assert_eq!(unheard(&followed, &played, 0), []);
        let mut late = followed.clone();
        for (i, r) in late.records.iter_mut().enumerate() {
            if let Record::Battery(b) = &mut r.record {
                b.stamp_ns = i as u64;
            }
        }
        let lost = unheard(&late, &played, 0);
        assert_eq!(lost.iter().map(|u| (u.uav.as_str(), u.stamp_ns)).collect::<Vec<_>>(), [("uav1", 1), ("uav1", 4)]);
        assert!(unheard(&late, &BTreeSet::from(["uav2"]), 0).is_empty());
        assert_eq!(
            s.battery.iter().map(|b| (b.after_tokens, b.uav.as_str())).collect::<Vec<_>>(),
            [(0, "uav1"), (2, "uav1"), (2, "uav2")]
        );
        assert_eq!(s.token_ns, [20, 30]);
        let at = |n, now| {
            battery_due(&s.battery, n, now)
                .into_iter()
                .map(|(u, b)| (u.to_string(), b.state_of_charge))
                .collect::<Vec<_>>()
        };
        // Before the first token: the steps recorded then, at once, whatever the time.
        assert_eq!(at(0, 0), [("uav1".to_string(), 1.0)]);
        assert_eq!(at(1, u64::MAX), [("uav1".to_string(), 1.0)]);
        // After two tokens: each step at its recorded time (40 and 50) ...
        assert_eq!(at(2, 39), [("uav1".to_string(), 1.0)]);
        assert_eq!(at(2, 45), [("uav1".to_string(), 0.5)]);
        assert_eq!(at(2, 50), [("uav1".to_string(), 0.5), ("uav2".to_string(), 0.9)]);
        // ... or once the token after it is out, if that comes first.
        assert_eq!(at(3, 0), [("uav1".to_string(), 0.5), ("uav2".to_string(), 0.9)]);
    }

    #[test]
    fn the_replay_clock_never_passes_the_next_tokens_recorded_time() {
        use std::time::Duration;
        let ms = |n: u64| Duration::from_millis(n);
        const MS: u64 = 1_000_000;
        // Recorded: start at 0, tokens at 1000, 1100 and 1500 ms (the last one `done`).
        let mut p = Pacer::new(0, vec![1000 * MS, 1100 * MS, 1500 * MS]);
        // Before the first token it runs free, even past the first token's time (a slow start).
        assert_eq!(p.advance(ms(1200), 0), Pace::Running);
        assert_eq!(p.now_ns(), 1200 * MS);
        // The first token: 200 ms later than recorded; later tokens are shifted as much.
        assert_eq!(p.advance(ms(0), 1), Pace::Running);
        assert_eq!(p.offset_ns(), Some(200 * MS as i64));
        assert_eq!(p.recorded_now_ns(), 1000 * MS);
        assert_eq!(p.advance(ms(50), 1), Pace::Running);
        // Token 1 was recorded at 1100 ms (1300 ms shifted): held there until it is out.
        assert_eq!(p.advance(ms(80), 1), Pace::Held { next: 1 });
        assert_eq!(p.now_ns(), 1300 * MS);
        assert_eq!(p.advance(ms(500), 1), Pace::Held { next: 1 });
        assert_eq!(p.now_ns(), 1300 * MS);
        // Out early (a faster swarm): no jump, the clock runs on from where it is.
        assert_eq!(p.advance(ms(10), 2), Pace::Running);
        assert_eq!(p.now_ns(), 1310 * MS);
        assert_eq!(p.replay_time_ns(1500 * MS), 1700 * MS);
        // Given up (the swarm needs more time than recorded): free until the next token.
        assert_eq!(p.advance(ms(400), 2), Pace::Held { next: 2 });
        p.release(2);
        assert_eq!(p.advance(ms(100), 2), Pace::Running);
        assert_eq!(p.now_ns(), 1800 * MS);
        assert_eq!(p.ahead_ns(), 0);
        // After the last (done) chunk: free; it came 110 ms past its (shifted) recorded time.
        assert_eq!(p.advance(ms(10), 3), Pace::Running);
        assert_eq!(p.ahead_ns(), 100 * MS);
        // A start faster than recorded: the offset is negative, the limits come earlier.
        let mut fast = Pacer::new(0, vec![1000 * MS, 1100 * MS]);
        fast.advance(ms(600), 0);
        fast.advance(ms(0), 1);
        assert_eq!(fast.offset_ns(), Some(-400 * MS as i64));
        assert_eq!(fast.recorded_now_ns(), 1000 * MS);
        assert_eq!(fast.advance(ms(150), 1), Pace::Held { next: 1 });
        assert_eq!(fast.now_ns(), 700 * MS);
        // A clock with nothing recorded runs free.
        let mut empty = Pacer::new(5, vec![]);
        assert_eq!(empty.advance(ms(1), 1), Pace::Running);
        assert_eq!(empty.offset_ns(), Some(0));
    }
}
