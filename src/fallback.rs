//! Failure detection without the watchdog (docs/security.md §5, "The watchdog's death"). The
//! watchdog beats on `/aerokv/watchdog/heartbeat`; the scheduler runs the same detector core
//! ([`Watchdog`]) over the executors' heartbeats it hears anyway, and its own declarations count
//! only while the watchdog is silent for longer than `watchdog_timeout_s`. A declaration the
//! fallback made while the watchdog was still alive is held, and released if the watchdog turns
//! out dead while that UAV is still silent (the watchdog and an executor that die together are
//! both noticed). Pure logic, no ROS.
use crate::detector::{Declaration, Event, Health, Watchdog, WatchdogParams};

/// The watchdog, as the scheduler hears it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WatchdogHealth {
    /// Heard within the timeout.
    Alive { silent_s: f64 },
    /// Silent for longer than the timeout (or never heard since the scheduler started): the
    /// scheduler's own declarations count.
    Dead { silent_s: f64, ever_heard: bool },
}

impl WatchdogHealth {
    pub fn is_dead(self) -> bool {
        matches!(self, WatchdogHealth::Dead { .. })
    }
}

/// What changed at a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The watchdog went silent: from now on the scheduler's declarations count.
    WatchdogSilent { silent_s: f64 },
    /// The watchdog beats again: its declarations count, the scheduler's no longer.
    WatchdogBack { silent_s: f64 },
    /// A declaration that counts (made or released while the watchdog is dead).
    Declared(Declaration),
}

#[derive(Debug)]
pub struct Fallback {
    detector: Watchdog,
    timeout_s: f64,
    /// When the watchdog was last heard (or when this started, if never).
    watchdog_last: f64,
    /// When any executor was last heard.
    executor_last: f64,
    ever_heard: bool,
    dead: bool,
    /// Declarations of the detector not released yet: they count once the watchdog is dead and
    /// other executors are heard while the UAV is silent.
    held: Vec<Declaration>,
    /// Declarations that counted.
    pub declared: u64,
}

impl Fallback {
    /// `p` must have passed validation; `now` is when the scheduler starts listening.
    pub fn new(p: WatchdogParams, timeout_s: f64, now: f64) -> Self {
        Fallback {
            detector: Watchdog::new(p),
            timeout_s,
            watchdog_last: now,
            executor_last: f64::NEG_INFINITY,
            ever_heard: false,
            dead: false,
            held: Vec::new(),
            declared: 0,
        }
    }

    pub fn watchdog_heartbeat(&mut self, now: f64) {
        self.watchdog_last = self.watchdog_last.max(now);
        self.ever_heard = true;
    }

    pub fn heartbeat(&mut self, uav: &str, sequence: u64, now: f64) {
        self.executor_last = self.executor_last.max(now);
        for e in self.detector.heartbeat(uav, sequence, now) {
            if let Event::Heard { uav, .. } = e {
                // Heard again: a held declaration about it is void.
                self.held.retain(|d| d.uav != uav);
            }
        }
    }

    pub fn battery(&mut self, uav: &str, energy_j: f64, now: f64) {
        if let Some(Event::Declared(d)) = self.detector.battery(uav, energy_j, now) {
            self.held.push(d);
        }
    }

    pub fn assignment(&mut self, epoch: u64, ring: impl IntoIterator<Item = String>, now: f64) {
        self.detector.assignment(epoch, ring, now);
        self.held.retain(|d| d.epoch >= epoch);
    }

    /// Dead: silent for longer than the timeout while executors were heard for the whole
    /// timeout after its last heartbeat. A scheduler that heard nobody (its own process or
    /// network stalled) cannot tell, and keeps counting on the watchdog.
    pub fn health(&self, now: f64) -> WatchdogHealth {
        let silent_s = (now - self.watchdog_last).max(0.0);
        if silent_s > self.timeout_s && self.executor_last - self.watchdog_last > self.timeout_s {
            WatchdogHealth::Dead { silent_s, ever_heard: self.ever_heard }
        } else {
            WatchdogHealth::Alive { silent_s }
        }
    }

    /// Judges the watchdog's and every member's silence at `now`; call every check period.
    pub fn check(&mut self, now: f64) -> Vec<Change> {
        let mut out = Vec::new();
        for e in self.detector.check(now) {
            match e {
                Event::Declared(d) => self.held.push(d),
                // This process was not listening: that time is nobody's silence, the watchdog's
                // neither.
                Event::Stalled { lag_s } => self.watchdog_last = (self.watchdog_last + lag_s).min(now),
                _ => {}
            }
        }
        match (self.dead, self.health(now)) {
            (false, WatchdogHealth::Dead { silent_s, .. }) => {
                self.dead = true;
                out.push(Change::WatchdogSilent { silent_s });
            }
            (true, WatchdogHealth::Alive { silent_s }) => {
                self.dead = false;
                out.push(Change::WatchdogBack { silent_s });
            }
            _ => {}
        }
        if self.dead && !self.held.is_empty() {
            let reports = self.detector.report(now);
            let still_declared = |uav: &str| reports.iter().any(|r| r.uav == uav && r.health == Health::Declared);
            // Another member heard well within this one's silence: not a deaf scheduler.
            let corroborated = |d: &Declaration| {
                let Some(mine) = d.silence_s else { return true };
                let others: Vec<f64> = reports
                    .iter()
                    .filter(|r| r.uav != d.uav && r.health != Health::Declared)
                    .map(|r| r.silence_s)
                    .collect();
                others.is_empty() || others.iter().any(|&s| s < mine / 2.0)
            };
            let (release, keep): (Vec<Declaration>, Vec<Declaration>) =
                std::mem::take(&mut self.held).into_iter().partition(|d| corroborated(d));
            self.held = keep.into_iter().filter(|d| still_declared(&d.uav)).collect();
            for d in release.into_iter().filter(|d| d.silence_s.is_none() || still_declared(&d.uav)) {
                self.declared += 1;
                out.push(Change::Declared(d));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallback() -> Fallback {
        let mut f = Fallback::new(WatchdogParams::default(), 1.0, 0.0);
        f.assignment(3, ["uav1".to_string(), "uav2".to_string()], 0.0);
        f
    }

    /// Both UAVs beat every 50 ms until `until`; uav2 stops at `uav2_until`.
    fn beat(f: &mut Fallback, from: f64, until: f64, uav2_until: f64, watchdog_until: f64) -> Vec<Change> {
        let mut out = Vec::new();
        let mut t = from;
        let mut seq = (from * 20.0) as u64;
        while t < until {
            f.heartbeat("uav1", seq, t);
            if t < uav2_until {
                f.heartbeat("uav2", seq, t);
            }
            if t < watchdog_until {
                f.watchdog_heartbeat(t);
            }
            out.extend(f.check(t + 0.01));
            t += 0.05;
            seq += 1;
        }
        out
    }

    fn declared(changes: &[Change]) -> Vec<String> {
        changes.iter().filter_map(|c| if let Change::Declared(d) = c { Some(d.uav.clone()) } else { None }).collect()
    }

    #[test]
    fn declarations_count_only_while_the_watchdog_is_dead() {
        let mut f = fallback();
        // uav2 dies while the watchdog lives: the watchdog declares it, the scheduler does not.
        let c = beat(&mut f, 0.0, 3.0, 1.5, 10.0);
        assert!(declared(&c).is_empty(), "{c:?}");
        assert!(matches!(f.health(3.0), WatchdogHealth::Alive { .. }));
        assert_eq!(f.declared, 0);
    }

    #[test]
    fn the_watchdog_dies_then_an_executor() {
        let mut f = fallback();
        let c = beat(&mut f, 0.0, 5.0, 3.0, 1.0);
        let silent = c.iter().position(|c| matches!(c, Change::WatchdogSilent { .. })).expect("watchdog noticed");
        let decl = c.iter().position(|c| matches!(c, Change::Declared(_))).expect("uav2 declared");
        assert!(silent < decl);
        assert_eq!(declared(&c), ["uav2"]);
        match &c[decl] {
            Change::Declared(d) => assert!(d.epoch == 3 && d.silence_s.unwrap() < 1.1, "{d:?}"),
            _ => unreachable!(),
        }
        assert!(f.health(5.0).is_dead());
    }

    #[test]
    fn a_declaration_held_while_the_watchdog_lived_is_released_when_it_is_found_dead() {
        let mut f = fallback();
        // uav2 stops at 1.0 s, the watchdog at 1.1 s: uav2 is declared (held) before the
        // watchdog's silence passes 1 s, and released then.
        let c = beat(&mut f, 0.0, 4.0, 1.0, 1.1);
        assert_eq!(declared(&c), ["uav2"], "{c:?}");
        assert_eq!(f.declared, 1);
    }

    #[test]
    fn a_held_declaration_is_void_when_the_uav_is_heard_again() {
        let mut f = fallback();
        let mut c = beat(&mut f, 0.0, 1.0, 0.5, 10.0); // uav2 silent from 0.5 s: declared, held
        c.extend(beat(&mut f, 1.0, 1.5, 10.0, 1.2)); // uav2 back; then the watchdog stops
        c.extend(beat(&mut f, 1.5, 3.0, 10.0, 0.0));
        assert!(c.iter().any(|c| matches!(c, Change::WatchdogSilent { .. })));
        assert!(declared(&c).is_empty(), "{c:?}");
    }

    #[test]
    fn a_scheduler_that_hears_nobody_does_not_take_over() {
        let mut f = fallback();
        let mut c = beat(&mut f, 0.0, 1.0, 10.0, 10.0);
        // Nothing arrives for 2 s (this process or its network stalled), then everyone again.
        for i in 0..100 {
            c.extend(f.check(1.0 + i as f64 * 0.02));
        }
        c.extend(beat(&mut f, 3.0, 4.0, 10.0, 10.0));
        assert!(!c.iter().any(|c| matches!(c, Change::WatchdogSilent { .. } | Change::Declared(_))), "{c:?}");
        assert_eq!(f.declared, 0);
    }

    #[test]
    fn the_watchdog_comes_back() {
        let mut f = fallback();
        let mut c = beat(&mut f, 0.0, 2.5, 10.0, 0.5);
        c.extend(beat(&mut f, 2.5, 3.0, 10.0, 10.0));
        assert!(c.iter().any(|c| matches!(c, Change::WatchdogBack { .. })), "{c:?}");
        assert!(!f.health(3.0).is_dead());
        // Never heard at all: dead once executors were heard for the timeout.
        let mut f = Fallback::new(WatchdogParams::default(), 1.0, 0.0);
        assert!(!f.health(1.5).is_dead(), "nobody heard");
        f.heartbeat("uav1", 1, 1.2);
        assert_eq!(f.health(1.5), WatchdogHealth::Dead { silent_s: 1.5, ever_heard: false });
    }
}
