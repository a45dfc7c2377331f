//! Epochs from one authority (docs/design.md, "Epochs"): the scheduler is the only node that
//! issues epochs, and a scheduler that starts (or restarts, with no memory) learns the swarm's
//! current epoch from the executors' heartbeats before it plans, then continues above it.
//! Readiness means "applied exactly this epoch": an executor that reports another epoch is not
//! ready, and one that reports a higher epoch means the plan was superseded (the scheduler plans
//! again above it). A step that is stuck names its cause: which UAV, in which epoch, and what it
//! last reported. Pure logic, no ROS.
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// What a shard executor says it is doing (`Heartbeat.state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorState {
    Waiting,
    Loading,
    Ready,
    Recovering,
    Stopping,
    /// It could not apply its epoch (`error: <why>`).
    Error(String),
    /// Anything else (a newer executor, or a hostile sender): never ready.
    Unknown(String),
}

impl ExecutorState {
    pub fn parse(s: &str) -> ExecutorState {
        match s {
            "waiting" => ExecutorState::Waiting,
            "loading" => ExecutorState::Loading,
            "ready" => ExecutorState::Ready,
            "recovering" => ExecutorState::Recovering,
            "stopping" => ExecutorState::Stopping,
            _ => match s.strip_prefix("error") {
                Some(why) => ExecutorState::Error(why.trim_start_matches(':').trim().to_string()),
                None => ExecutorState::Unknown(s.chars().take(80).collect()),
            },
        }
    }
}

impl fmt::Display for ExecutorState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecutorState::Waiting => f.write_str("waiting"),
            ExecutorState::Loading => f.write_str("loading"),
            ExecutorState::Ready => f.write_str("ready"),
            ExecutorState::Recovering => f.write_str("recovering"),
            ExecutorState::Stopping => f.write_str("stopping"),
            ExecutorState::Error(why) => write!(f, "error: {why}"),
            ExecutorState::Unknown(s) => write!(f, "unknown state {s:?}"),
        }
    }
}

/// The last heartbeat of one executor, as far as readiness and stalls are concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub epoch: u64,
    pub state: ExecutorState,
    pub request_id: u64,
    pub kv_tokens: u32,
    /// Time since it was received.
    pub age: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "last reported epoch {}, {}, request {}, {} tokens cached, {:.1} s ago",
            self.epoch,
            self.state,
            self.request_id,
            self.kv_tokens,
            self.age.as_secs_f64()
        )
    }
}

/// One stage of a plan that is not where the plan needs it, and what it last said.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    pub uav: String,
    pub last: Option<Report>,
}

impl fmt::Display for Lag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.last {
            Some(r) => write!(f, "{} ({r})", self.uav),
            None => write!(f, "{} (never heard)", self.uav),
        }
    }
}

/// Where the stages of a plan of epoch `epoch` stand.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    /// Every stage reports exactly this epoch and "ready".
    Ready,
    /// Some stages have not applied it yet.
    Waiting(Vec<Lag>),
    /// A stage runs a higher epoch: this plan came from a scheduler that did not know the swarm's
    /// epoch (it restarted and missed that UAV), or from another authority. Plan again above it.
    Superseded { uav: String, epoch: u64 },
    /// A stage could not apply this epoch.
    Refused { uav: String, why: String },
}

/// Readiness of the plan of `epoch` over `stages` (UAV and its last report, if any).
pub fn readiness<'a>(epoch: u64, stages: impl IntoIterator<Item = (&'a str, Option<&'a Report>)>) -> Readiness {
    let mut waiting = Vec::new();
    for (uav, last) in stages {
        match last {
            Some(r) if r.epoch > epoch => return Readiness::Superseded { uav: uav.into(), epoch: r.epoch },
            Some(Report { epoch: e, state: ExecutorState::Error(why), .. }) if *e == epoch => {
                return Readiness::Refused { uav: uav.into(), why: why.clone() }
            }
            Some(Report { epoch: e, state: ExecutorState::Ready, .. }) if *e == epoch => {}
            _ => waiting.push(Lag { uav: uav.into(), last: last.cloned() }),
        }
    }
    if waiting.is_empty() {
        Readiness::Ready
    } else {
        Readiness::Waiting(waiting)
    }
}

/// Why a pipeline step produced no output: the stages that do not run this epoch, or are
/// silent, first; when every stage looks fine, all of them (the message was lost on the way).
pub fn diagnose_stall<'a>(
    epoch: u64,
    request_id: u64,
    stages: impl IntoIterator<Item = (&'a str, Option<&'a Report>)>,
    silent_after: Duration,
) -> String {
    let all: Vec<Lag> = stages.into_iter().map(|(uav, r)| Lag { uav: uav.into(), last: r.cloned() }).collect();
    let suspect: Vec<&Lag> = all
        .iter()
        .filter(|l| {
            l.last.as_ref().is_none_or(|r| {
                r.epoch != epoch
                    || r.state != ExecutorState::Ready
                    || r.age > silent_after
                    || r.request_id != request_id
            })
        })
        .collect();
    let list = |v: &[&Lag]| v.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("; ");
    if suspect.is_empty() {
        let every: Vec<&Lag> = all.iter().collect();
        format!("every stage reports epoch {epoch} ready (the message was lost on the way?): {}", list(&every))
    } else {
        format!("stage(s) not serving epoch {epoch}, request {request_id}: {}", list(&suspect))
    }
}

/// The scheduler's epochs: the highest it issued and the highest any executor reported, and
/// whether it has listened long enough to plan.
#[derive(Debug, Clone)]
pub struct EpochClock {
    issued: u64,
    heard: BTreeMap<String, u64>,
    started: Instant,
    settle: Duration,
    expected: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("epoch {0} reported by an executor leaves no room for a new epoch")]
    Exhausted(u64),
}

impl EpochClock {
    /// A scheduler that started at `started` and knows nothing yet. It may plan once it has heard
    /// `expected` executors or listened for `settle`, whichever comes first.
    pub fn new(started: Instant, settle: Duration, expected: usize) -> Self {
        EpochClock { issued: 0, heard: BTreeMap::new(), started, settle, expected }
    }

    /// An executor's heartbeat (one that passed authentication and the telemetry checks)
    /// reported `epoch`. True when it is above everything issued or heard so far.
    pub fn observe(&mut self, uav: &str, epoch: u64) -> bool {
        let above = epoch > self.current();
        let e = self.heard.entry(uav.to_string()).or_insert(0);
        *e = (*e).max(epoch);
        above
    }

    /// Another scheduler issued `epoch` (a standby follows the primary's plans): this one's plans
    /// go above it, even when no executor has applied it yet.
    pub fn followed(&mut self, epoch: u64) {
        self.issued = self.issued.max(epoch);
    }

    /// The highest epoch issued by this scheduler or applied by any executor it heard.
    pub fn current(&self) -> u64 {
        self.heard.values().copied().max().unwrap_or(0).max(self.issued)
    }

    /// An epoch reported above the last one this scheduler issued: its plan is not the swarm's.
    pub fn behind(&self) -> Option<u64> {
        let c = self.current();
        (c > self.issued).then_some(c)
    }

    /// May the scheduler plan now (it has heard enough executors to know the swarm's epoch)?
    pub fn settled(&self, now: Instant) -> bool {
        self.heard.len() >= self.expected || now.saturating_duration_since(self.started) >= self.settle
    }

    /// The epoch the next plan gets: above everything issued and heard. Counted as issued.
    pub fn issue(&mut self) -> Result<u64, EpochError> {
        let c = self.current();
        let next = c.checked_add(1).filter(|&n| n < u64::MAX).ok_or(EpochError::Exhausted(c))?;
        self.issued = next;
        Ok(next)
    }

    /// The next epoch without issuing it.
    pub fn peek(&self) -> u64 {
        self.current().saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(epoch: u64, state: &str) -> Report {
        Report {
            epoch,
            state: ExecutorState::parse(state),
            request_id: 1,
            kv_tokens: 9,
            age: Duration::from_millis(100),
        }
    }

    #[test]
    fn states_parse_and_print() {
        for s in ["waiting", "loading", "ready", "recovering", "stopping"] {
            assert_eq!(ExecutorState::parse(s).to_string(), s);
        }
        assert_eq!(ExecutorState::parse("error: no layers"), ExecutorState::Error("no layers".into()));
        assert!(matches!(ExecutorState::parse("readyish"), ExecutorState::Unknown(_)));
    }

    #[test]
    fn ready_means_exactly_this_epoch() {
        let (a, b) = (report(5, "ready"), report(5, "ready"));
        assert_eq!(readiness(5, [("uav1", Some(&a)), ("uav2", Some(&b))]), Readiness::Ready);
        // An executor still at an older epoch is not ready, even when it says "ready".
        let old = report(4, "ready");
        match readiness(5, [("uav1", Some(&a)), ("uav2", Some(&old))]) {
            Readiness::Waiting(l) => {
                assert_eq!(l.len(), 1);
                assert_eq!(l[0].uav, "uav2");
                assert!(l[0].to_string().contains("last reported epoch 4, ready"), "{}", l[0]);
            }
            r => panic!("{r:?}"),
        }
        // One at a higher epoch is not "at least ready": the plan was superseded.
        let newer = report(9, "ready");
        assert_eq!(
            readiness(5, [("uav1", Some(&a)), ("uav2", Some(&newer))]),
            Readiness::Superseded { uav: "uav2".into(), epoch: 9 }
        );
        let err = report(5, "error: layer file corrupt");
        assert_eq!(
            readiness(5, [("uav1", Some(&err))]),
            Readiness::Refused { uav: "uav1".into(), why: "layer file corrupt".into() }
        );
        // An error of an older epoch is not about this plan: still waiting.
        let old_err = report(4, "error: x");
        assert!(matches!(readiness(5, [("uav1", Some(&old_err))]), Readiness::Waiting(_)));
        match readiness(5, [("uav3", None)]) {
            Readiness::Waiting(l) => assert_eq!(l[0].to_string(), "uav3 (never heard)"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn a_restarted_scheduler_continues_above_the_swarm() {
        let t0 = Instant::now();
        let mut c = EpochClock::new(t0, Duration::from_secs(2), 2);
        assert!(!c.settled(t0));
        assert!(c.observe("uav1", 7));
        assert!(!c.settled(t0), "one of two executors heard");
        assert!(!c.observe("uav2", 6));
        assert!(c.settled(t0));
        assert_eq!(c.issue(), Ok(8));
        assert_eq!(c.behind(), None);
        // A UAV it had not heard runs a later epoch: the plan is behind and the next goes above it.
        assert!(c.observe("uav3", 12));
        assert_eq!(c.behind(), Some(12));
        assert_eq!(c.issue(), Ok(13));
        assert_eq!(c.current(), 13);
        // Epochs never go back, whatever an executor reports later.
        assert!(!c.observe("uav1", 1));
        assert_eq!(c.issue(), Ok(14));
    }

    /// A standby plans above the primary's plans even when no executor has applied them yet.
    #[test]
    fn a_followed_plan_is_above_which_the_next_goes() {
        let mut c = EpochClock::new(Instant::now(), Duration::ZERO, 0);
        c.observe("uav1", 4);
        c.followed(6);
        c.followed(5);
        assert_eq!(c.issue(), Ok(7));
    }

    #[test]
    fn settling_is_bounded() {
        let t0 = Instant::now();
        let c = EpochClock::new(t0, Duration::from_secs(2), 4);
        assert!(!c.settled(t0 + Duration::from_millis(1999)));
        assert!(c.settled(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn epochs_cannot_overflow() {
        let mut c = EpochClock::new(Instant::now(), Duration::ZERO, 0);
        c.observe("uav1", u64::MAX - 1);
        assert_eq!(c.issue(), Err(EpochError::Exhausted(u64::MAX - 1)));
    }

    #[test]
    fn a_stall_names_the_stage_at_fault() {
        let (ok, silent, old) = (
            report(5, "ready"),
            Report { age: Duration::from_secs(12), ..report(5, "ready") },
            report(4, "recovering"),
        );
        let why = diagnose_stall(
            5,
            1,
            [("uav1", Some(&ok)), ("uav2", Some(&silent)), ("uav3", Some(&old)), ("uav4", None)],
            Duration::from_secs(1),
        );
        assert!(!why.contains("uav1"), "{why}");
        assert!(why.contains("uav2 (last reported epoch 5, ready, request 1, 9 tokens cached, 12.0 s ago)"), "{why}");
        assert!(why.contains("uav3 (last reported epoch 4, recovering"), "{why}");
        assert!(why.contains("uav4 (never heard)"), "{why}");
        let lost = diagnose_stall(5, 1, [("uav1", Some(&ok))], Duration::from_secs(1));
        assert!(lost.starts_with("every stage reports epoch 5 ready"), "{lost}");
    }
}
