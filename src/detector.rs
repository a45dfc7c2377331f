//! Failure detection over lossy links, without ROS: the watchdog's decisions.
//!
//! Per UAV an accrual detector over heartbeat inter-arrival times. Heartbeats carry a sequence
//! number, so a window of `(inter-arrival time, sequence step)` samples gives three estimates:
//! the sending period `P` (time over steps), the loss rate `L` (missing steps over steps, at
//! least `min_loss`) and the arrival jitter `sigma` (spread of each inter-arrival around
//! `step x P`, at least `min_std_dev_s`). Under that model (heartbeats every `P`, each lost
//! independently with probability `L`, arrivals jittered normally) the chance of hearing
//! nothing for `t` after the last arrival is
//!
//! ```text
//! P(silence >= t) = prod_{k >= 1} ( L + (1 - L) * Q((t - k P) / sigma) )     Q: normal upper tail
//! ```
//!
//! and `phi = -log10 P(silence >= t)`. Each period that passes without a heartbeat adds about
//! `-log10 L` to phi, so a lossy link needs a longer silence than a clean one for the same
//! evidence, and a jittery one a longer wait within each period.
//!
//! States: [`Health::Alive`] -> [`Health::Suspected`] (phi >= `suspect_phi`; triggers nothing) ->
//! [`Health::Declared`] (phi >= `declare_phi` and silence >= `min_declare_s`, or silence >=
//! `max_silence_s` whatever phi says); a heartbeat brings a suspected UAV back to alive. An empty
//! battery is declared at once. Declarations are made once per UAV and epoch, only for members of
//! the current ring. Time the watchdog itself was not listening (a stalled process, a starved
//! CPU) is nobody's silence: it is taken out of every UAV's silence.
use crate::params::{InvalidParam, Validate};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

/// Why a UAV was declared failed; its wire form is `FailureEvent.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Its heartbeats stopped (phi passed the declaration threshold, or the hard silence limit).
    HeartbeatTimeout,
    /// It reported an empty battery.
    BatteryEmpty,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::HeartbeatTimeout => "heartbeat_timeout",
            FailureReason::BatteryEmpty => "battery_empty",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown failure reason `{0}`")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for FailureReason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "heartbeat_timeout" => Ok(FailureReason::HeartbeatTimeout),
            "battery_empty" => Ok(FailureReason::BatteryEmpty),
            _ => Err(UnknownReason(s.to_string())),
        }
    }
}

/// What decided a declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// phi passed `declare_phi` (after at least `min_declare_s` of silence).
    Phi,
    /// Silent for `max_silence_s`, whatever the model says.
    MaxSilence,
    /// The battery reported empty.
    Battery,
}

/// A UAV's state as the watchdog sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Alive,
    /// Silent longer than its heartbeat history makes likely; no recovery yet.
    Suspected,
    /// Declared failed (in the epoch of the declaration).
    Declared,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspected => "suspected",
            Health::Declared => "declared",
        }
    }
}

/// The watchdog's parameters (`/**/watchdog` in `config/swarm.yaml`).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogParams {
    /// The executors' heartbeat period: the model of a UAV before its first inter-arrivals.
    pub expected_interval_s: f64,
    /// Inter-arrival samples kept per UAV.
    pub window: usize,
    /// Floor of the jitter estimate, s.
    pub min_std_dev_s: f64,
    /// Floor of the loss estimate (0..1): no link is believed to lose less.
    pub min_loss: f64,
    /// phi from which a UAV is suspected (logged and reported, nothing else).
    pub suspect_phi: f64,
    /// phi from which a UAV is declared failed.
    pub declare_phi: f64,
    /// No declaration from heartbeats before this much silence, s.
    pub min_declare_s: f64,
    /// Declared after this much silence whatever phi says, s.
    pub max_silence_s: f64,
    /// A check that comes this much later than its period means the watchdog was not listening.
    pub stall_tolerance_s: f64,
    pub check_period_s: f64,
    /// How often to look for new UAV topics (new members), s.
    pub discovery_period_s: f64,
    /// The node's keystore directory (docs/security.md); empty: authentication off. Not used by
    /// the detector itself.
    pub keystore: String,
}

impl Default for WatchdogParams {
    /// Shared memory on one machine: executors beat every 50 ms, nothing is lost.
    fn default() -> Self {
        WatchdogParams {
            expected_interval_s: 0.05,
            window: 500,
            min_std_dev_s: 0.01,
            min_loss: 1e-4,
            suspect_phi: 5.0,
            declare_phi: 8.0,
            min_declare_s: 0.15,
            max_silence_s: 1.0,
            stall_tolerance_s: 0.04,
            check_period_s: 0.02,
            discovery_period_s: 0.5,
            keystore: String::new(),
        }
    }
}

impl Validate for WatchdogParams {
    fn validate(&self) -> Result<(), InvalidParam> {
        let positive = [
            ("expected_interval_s", self.expected_interval_s),
            ("min_std_dev_s", self.min_std_dev_s),
            ("suspect_phi", self.suspect_phi),
            ("min_declare_s", self.min_declare_s),
            ("stall_tolerance_s", self.stall_tolerance_s),
            ("check_period_s", self.check_period_s),
            ("discovery_period_s", self.discovery_period_s),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(InvalidParam::new(field, format!("must be a positive number, got {v}")));
            }
        }
        if self.window < 4 {
            return Err(InvalidParam::new("window", format!("must be at least 4 samples, got {}", self.window)));
        }
        if !(self.min_loss > 0.0 && self.min_loss < 1.0) {
            return Err(InvalidParam::new("min_loss", format!("must be in (0, 1), got {}", self.min_loss)));
        }
        if !(self.declare_phi.is_finite() && self.declare_phi > self.suspect_phi) {
            return Err(InvalidParam::new(
                "declare_phi",
                format!("must be greater than suspect_phi ({}), got {}", self.suspect_phi, self.declare_phi),
            ));
        }
        if !(self.max_silence_s.is_finite() && self.max_silence_s >= self.min_declare_s) {
            return Err(InvalidParam::new(
                "max_silence_s",
                format!("must be at least min_declare_s ({}), got {}", self.min_declare_s, self.max_silence_s),
            ));
        }
        Ok(())
    }
}

/// The inter-arrival model of one UAV now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArrivalModel {
    pub period_s: f64,
    pub loss: f64,
    pub std_dev_s: f64,
}

/// phi never needs to be larger than this to be compared with any threshold.
const PHI_CAP: f64 = 100.0;
/// A sequence step above this is not believed (a restarted or hostile sender).
const MAX_SEQUENCE_STEP: u64 = 10_000;
/// The shortest period the model will assume, s (bounds the work of one phi).
const MIN_PERIOD_S: f64 = 1e-3;

impl ArrivalModel {
    /// `-log10 P(no heartbeat for silence_s)` under this model, capped at 100.
    pub fn phi(&self, silence_s: f64) -> f64 {
        let mut phi = 0.0;
        let mut k = 1.0;
        loop {
            let z = (silence_s - k * self.period_s) / self.std_dev_s;
            // Heartbeat k (and every later one) is not due yet: it adds nothing.
            if z < -8.0 {
                return phi;
            }
            let late = 0.5 * libm::erfc(z / std::f64::consts::SQRT_2);
            phi -= (self.loss + (1.0 - self.loss) * late).log10();
            if phi >= PHI_CAP {
                return PHI_CAP;
            }
            k += 1.0;
        }
    }
}

/// One inter-arrival: its time, the sequence step it spans and how many of the heartbeats in
/// between are still missing.
#[derive(Clone, Copy, Debug)]
struct Sample {
    dt: f64,
    step: u64,
    missing: u64,
}

impl Sample {
    fn new(dt: f64, step: u64) -> Self {
        Sample { dt, step, missing: step - 1 }
    }
}

/// One UAV's heartbeat history and state.
#[derive(Clone, Debug)]
struct Detector {
    /// Inter-arrivals, oldest first.
    samples: VecDeque<Sample>,
    model: ArrivalModel,
    last_arrival: f64,
    last_sequence: u64,
    /// The next heartbeat only re-baselines (after the watchdog stalled).
    skip_sample: bool,
    health: Health,
    /// The largest inter-arrival seen, s.
    max_gap_s: f64,
}

impl Detector {
    fn new(p: &WatchdogParams, now: f64, sequence: u64) -> Self {
        // Bootstrap: two samples around the expected interval (mean P, spread P/4) until the
        // UAV's own inter-arrivals push them out of the window.
        let e = p.expected_interval_s;
        let mut d = Detector {
            samples: VecDeque::from([Sample::new(0.75 * e, 1), Sample::new(1.25 * e, 1)]),
            model: ArrivalModel { period_s: e, loss: p.min_loss, std_dev_s: p.min_std_dev_s },
            last_arrival: now,
            last_sequence: sequence,
            skip_sample: false,
            health: Health::Alive,
            max_gap_s: 0.0,
        };
        d.refit(p);
        d
    }

    fn heartbeat(&mut self, p: &WatchdogParams, now: f64, sequence: u64) {
        let dt = (now - self.last_arrival).max(0.0);
        self.last_arrival = now;
        // One that does not advance the sequence (overtaken on the way, repeated, or from a sender
        // without one) is alive but says nothing about the period; one overtaken was not lost.
        if sequence <= self.last_sequence {
            if let Some(gap) = self.samples.iter_mut().rev().find(|s| s.missing > 0) {
                gap.missing -= 1;
                self.refit(p);
            }
            return;
        }
        let step = (sequence - self.last_sequence).min(MAX_SEQUENCE_STEP);
        self.last_sequence = sequence;
        if !std::mem::take(&mut self.skip_sample) {
            self.max_gap_s = self.max_gap_s.max(dt);
            if self.samples.len() >= p.window {
                self.samples.pop_front();
            }
            self.samples.push_back(Sample::new(dt, step));
            self.refit(p);
        }
    }

    fn refit(&mut self, p: &WatchdogParams) {
        let (time, steps, lost) =
            self.samples.iter().fold((0.0, 0u64, 0u64), |(t, n, l), s| (t + s.dt, n + s.step, l + s.missing));
        let period = (time / steps.max(1) as f64).max(MIN_PERIOD_S);
        let var = self.samples.iter().map(|s| (s.dt - s.step as f64 * period).powi(2)).sum::<f64>()
            / self.samples.len().max(1) as f64;
        self.model = ArrivalModel {
            period_s: period,
            loss: (lost as f64 / steps.max(1) as f64).clamp(p.min_loss, 0.99),
            std_dev_s: var.sqrt().max(p.min_std_dev_s),
        };
    }

    fn silence(&self, now: f64) -> f64 {
        (now - self.last_arrival).max(0.0)
    }
}

/// A declaration of failure, to be published once.
#[derive(Clone, Debug, PartialEq)]
pub struct Declaration {
    pub uav: String,
    pub epoch: u64,
    pub reason: FailureReason,
    pub evidence: Evidence,
    pub phi: f64,
    /// Since its last heartbeat; `None` when it never sent one.
    pub silence_s: Option<f64>,
}

/// What changed at a heartbeat, a battery report or a check.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Suspected {
        uav: String,
        phi: f64,
        silence_s: f64,
    },
    /// A suspected or declared UAV was heard again.
    Heard {
        uav: String,
        was: Health,
        silence_s: f64,
    },
    Declared(Declaration),
    /// The watchdog was not listening for `lag_s`; that time is not counted as silence.
    Stalled {
        lag_s: f64,
    },
}

/// A UAV's state and model, for diagnostics.
#[derive(Clone, Debug, PartialEq)]
pub struct UavReport {
    pub uav: String,
    pub health: Health,
    pub phi: f64,
    pub silence_s: f64,
    pub model: ArrivalModel,
    /// Inter-arrivals in the window: (samples, p50, p99) in seconds, and the largest ever seen.
    pub samples: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_gap_s: f64,
}

/// The watchdog: every UAV's detector, the current epoch and ring, declarations made.
#[derive(Debug)]
pub struct Watchdog {
    p: WatchdogParams,
    uavs: BTreeMap<String, Detector>,
    epoch: u64,
    /// Members of the current plan (`None`: no plan yet, everyone counts).
    ring: Option<BTreeSet<String>>,
    declared: HashSet<(u64, String)>,
    last_check: Option<f64>,
}

impl Watchdog {
    /// New thresholds from now on (parameters changed while the watchdog runs); `p` must have
    /// passed [`Validate::validate`]. What was learnt of every UAV is kept.
    pub fn set_params(&mut self, p: WatchdogParams) {
        self.p = p;
    }

    /// Members of the current plan (`None`: no plan yet).
    pub fn ring(&self) -> Option<&BTreeSet<String>> {
        self.ring.as_ref()
    }

    /// `p` must have passed [`Validate::validate`].
    pub fn new(p: WatchdogParams) -> Self {
        Watchdog { p, uavs: BTreeMap::new(), epoch: 0, ring: None, declared: HashSet::new(), last_check: None }
    }

    /// The latest epoch it follows.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A new assignment, received at `now`: its epoch (never goes back) and its ring.
    pub fn assignment(&mut self, epoch: u64, ring: impl IntoIterator<Item = String>, now: f64) {
        let ring: BTreeSet<String> = ring.into_iter().collect();
        if epoch > self.epoch {
            // A UAV declared in an older epoch that the new plan counts on again is judged again,
            // from the plan on: the scheduler heard it (a UAV back in range), this watchdog may
            // not have yet (its readers match again a moment later), and the silence before the
            // declaration is no evidence against the new member.
            for (uav, d) in self.uavs.iter_mut() {
                if d.health == Health::Declared && ring.contains(uav) {
                    *d = Detector::new(&self.p, now, d.last_sequence);
                }
            }
        }
        self.epoch = self.epoch.max(epoch);
        self.ring = Some(ring);
    }

    /// A heartbeat from `uav` with its sequence number, received at `now` (seconds, any origin).
    pub fn heartbeat(&mut self, uav: &str, sequence: u64, now: f64) -> Vec<Event> {
        let mut out: Vec<Event> = self.note_stall(now).into_iter().collect();
        let p = &self.p;
        let Some(d) = self.uavs.get_mut(uav) else {
            self.uavs.insert(uav.to_string(), Detector::new(p, now, sequence));
            return out;
        };
        let silence_s = d.silence(now);
        match d.health {
            Health::Alive => d.heartbeat(p, now, sequence),
            Health::Suspected => {
                d.heartbeat(p, now, sequence);
                d.health = Health::Alive;
                out.push(Event::Heard { uav: uav.to_string(), was: Health::Suspected, silence_s });
            }
            // Back after a declaration: a new member, with a fresh history. Its next silence is
            // a new failure, declared again even in the same epoch (the first declaration may
            // have been refused as false by the scheduler, which heard it meanwhile).
            Health::Declared => {
                *d = Detector::new(p, now, sequence);
                self.declared.remove(&(self.epoch, uav.to_string()));
                out.push(Event::Heard { uav: uav.to_string(), was: Health::Declared, silence_s });
            }
        }
        out
    }

    /// A battery report: an empty battery is declared at once.
    pub fn battery(&mut self, uav: &str, energy_j: f64, now: f64) -> Option<Event> {
        // NaN is not empty: a broken report is no evidence of anything.
        if energy_j.is_nan() || energy_j > 0.0 {
            return None;
        }
        let silence_s = self.uavs.get(uav).map(|d| d.silence(now));
        self.declare(uav, FailureReason::BatteryEmpty, Evidence::Battery, f64::NAN, silence_s)
    }

    /// Judges every member's silence at `now`; call every `check_period_s`.
    pub fn check(&mut self, now: f64) -> Vec<Event> {
        if let Some(stall) = self.note_stall(now) {
            // The queue of what arrived during the stall is not drained yet: judge next time.
            self.last_check = Some(now);
            return vec![stall];
        }
        self.last_check = Some(now);
        let mut out = Vec::new();
        let mut due = Vec::new();
        for (uav, d) in self.uavs.iter_mut() {
            let member = self.ring.as_ref().is_none_or(|r| r.contains(uav));
            if !member || d.health == Health::Declared {
                continue;
            }
            let silence_s = d.silence(now);
            let phi = d.model.phi(silence_s);
            if silence_s >= self.p.max_silence_s {
                due.push((uav.clone(), Evidence::MaxSilence, phi, silence_s));
            } else if phi >= self.p.declare_phi && silence_s >= self.p.min_declare_s {
                due.push((uav.clone(), Evidence::Phi, phi, silence_s));
            } else if phi >= self.p.suspect_phi && d.health == Health::Alive {
                d.health = Health::Suspected;
                out.push(Event::Suspected { uav: uav.clone(), phi, silence_s });
            }
        }
        for (uav, evidence, phi, silence_s) in due {
            out.extend(self.declare(&uav, FailureReason::HeartbeatTimeout, evidence, phi, Some(silence_s)));
        }
        out
    }

    /// Every known UAV's state at `now`, for diagnostics.
    pub fn report(&self, now: f64) -> Vec<UavReport> {
        self.uavs
            .iter()
            .map(|(uav, d)| {
                let silence_s = d.silence(now);
                let mut gaps: Vec<f64> = d.samples.iter().map(|s| s.dt).collect();
                gaps.sort_by(f64::total_cmp);
                let at =
                    |q: f64| gaps.get(((gaps.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
                UavReport {
                    uav: uav.clone(),
                    health: d.health,
                    phi: d.model.phi(silence_s),
                    silence_s,
                    model: d.model,
                    samples: gaps.len(),
                    p50_s: at(0.5),
                    p99_s: at(0.99),
                    max_gap_s: d.max_gap_s,
                }
            })
            .collect()
    }

    /// If the time since the last check is longer than its period by more than the tolerance,
    /// the watchdog was not listening: that time is taken out of everyone's silence.
    fn note_stall(&mut self, now: f64) -> Option<Event> {
        let lag = now - self.last_check? - self.p.check_period_s;
        if lag <= self.p.stall_tolerance_s {
            return None;
        }
        self.last_check = Some(now);
        for d in self.uavs.values_mut() {
            d.last_arrival = (d.last_arrival + lag).min(now);
            // What arrives next was queued during the stall: its arrival time says nothing.
            d.skip_sample = true;
        }
        Some(Event::Stalled { lag_s: lag })
    }

    fn declare(
        &mut self,
        uav: &str,
        reason: FailureReason,
        evidence: Evidence,
        phi: f64,
        silence_s: Option<f64>,
    ) -> Option<Event> {
        if !self.declared.insert((self.epoch, uav.to_string())) {
            return None;
        }
        if let Some(d) = self.uavs.get_mut(uav) {
            d.health = Health::Declared;
        }
        Some(Event::Declared(Declaration { uav: uav.to_string(), epoch: self.epoch, reason, evidence, phi, silence_s }))
    }
}

#[cfg(test)]
mod tests;
