//! Time for the nodes, without ROS: the wall clock, or a simulated clock that only moves when it
//! is told to (the ROS adapter feeds it `/clock` when `use_sim_time` is true).
//!
//! Every timer, timeout, stamp and rate of a node goes through one [`Clock`]. Core code that
//! measures durations with [`Instant`]s keeps doing so: [`Clock::instant`] is the clock's time
//! as an `Instant` (the wall clock's own, or one that advances with simulated time), so a
//! membership timeout or a detector's silence follows simulated time unchanged. What measures
//! the machine itself (how long a layer takes to compute) stays on the wall clock.
use futures::future::BoxFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// A node's time.
pub trait Clock: Send + Sync + 'static {
    /// Time since the UNIX epoch (simulated time: what `/clock` said last; zero before it spoke).
    fn now(&self) -> Duration;
    /// The clock's time as a monotonic `Instant` (for durations between two readings).
    fn instant(&self) -> Instant;
    /// Resolves once the clock has moved `d` past the time of the call.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
    /// True for a simulated clock.
    fn is_simulated(&self) -> bool;
}

/// The machine's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
    fn is_simulated(&self) -> bool {
        false
    }
}

/// Simulated time, set from outside ([`SimClock::set`]); sleepers wake when it reaches them.
/// Time may jump, stand still (nothing times out) or go back (a bag played again: sleepers wait
/// for the new time to reach them, `instant()` never goes back).
pub struct SimClock {
    time: watch::Sender<Duration>,
    /// The `Instant` that stands for the first time set, and that time.
    origin: Instant,
    first: Mutex<Option<Duration>>,
    /// The latest `instant()` handed out: it never goes back.
    latest: Mutex<Instant>,
}

impl Default for SimClock {
    fn default() -> Self {
        let origin = Instant::now();
        SimClock { time: watch::channel(Duration::ZERO).0, origin, first: Mutex::new(None), latest: Mutex::new(origin) }
    }
}

impl SimClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The simulator's time is now `t` (since the UNIX epoch, as `/clock` carries it).
    pub fn set(&self, t: Duration) {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(t);
        self.time.send_replace(t);
    }

    /// True once a time has been set.
    pub fn started(&self) -> bool {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        *self.time.borrow()
    }
    fn instant(&self) -> Instant {
        let first = *self.first.lock().unwrap_or_else(|e| e.into_inner());
        let at = first.map_or(self.origin, |f| self.origin + self.now().saturating_sub(f));
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        *latest = (*latest).max(at);
        *latest
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        let until = self.now() + d;
        let mut rx = self.time.subscribe();
        Box::pin(async move {
            // The sender lives as long as the clock; a dropped clock never wakes its sleepers.
            if rx.wait_for(|&t| t >= until).await.is_err() {
                futures::future::pending::<()>().await;
            }
        })
    }
    fn is_simulated(&self) -> bool {
        true
    }
}

/// A periodic timer on a [`Clock`]: the first tick at once, then every `period`; a tick that
/// comes late (a jump of simulated time, a busy process) is followed by the next one a full
/// period later, not by a burst.
pub struct Interval {
    clock: Arc<dyn Clock>,
    period: Duration,
    next: Option<Instant>,
}

impl Interval {
    pub fn new(clock: Arc<dyn Clock>, period: Duration) -> Self {
        Interval { clock, period: period.max(Duration::from_micros(1)), next: None }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        let now = self.clock.instant();
        let next = *self.next.get_or_insert(now);
        if next > now {
            self.clock.sleep(next - now).await;
        }
        let after = self.clock.instant();
        let mut following = next + self.period;
        if following <= after {
            following = after + self.period;
        }
        self.next = Some(following);
    }
}

/// `fut`, or `Err(Elapsed)` once `clock` has moved `d`.
pub async fn timeout<F: std::future::Future>(clock: &dyn Clock, d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    tokio::select! {
        out = fut => Ok(out),
        _ = clock.sleep(d) => Err(Elapsed(d)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("timed out after {0:?}")]
pub struct Elapsed(pub Duration);

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test]
    async fn a_sim_sleep_ends_only_when_the_clock_gets_there() {
        let clock = SimClock::new();
        clock.set(secs(100.0));
        let mut sleep = clock.sleep(secs(1.0));
        assert!((&mut sleep).now_or_never().is_none());
        // Real time passing moves nothing.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!((&mut sleep).now_or_never().is_none());
        clock.set(secs(100.5));
        assert!((&mut sleep).now_or_never().is_none());
        clock.set(secs(101.0));
        assert_eq!((&mut sleep).now_or_never(), Some(()));
    }

    #[tokio::test]
    async fn sim_instants_follow_sim_time_and_never_go_back() {
        let clock = SimClock::new();
        let before = clock.instant();
        clock.set(secs(50.0));
        let a = clock.instant();
        clock.set(secs(52.5));
        let b = clock.instant();
        assert_eq!(b - a, secs(2.5));
        assert!(a >= before);
        clock.set(secs(10.0)); // played again from an earlier time
        assert_eq!(clock.instant(), b);
        assert_eq!(clock.now(), secs(10.0));
    }

    #[tokio::test]
    async fn an_interval_ticks_with_sim_time_without_bursts() {
        let clock = SimClock::new();
        clock.set(secs(0.0));
        let mut iv = Interval::new(clock.clone(), secs(0.1));
        assert!(iv.tick().now_or_never().is_some(), "first tick at once");
        assert!(iv.tick().now_or_never().is_none());
        clock.set(secs(0.1));
        assert!(iv.tick().now_or_never().is_some());
        // A jump of a whole second: one tick, then the next a period later.
        clock.set(secs(1.1));
        assert!(iv.tick().now_or_never().is_some());
        assert!(iv.tick().now_or_never().is_none());
        clock.set(secs(1.2));
        assert!(iv.tick().now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_timeout_on_a_stopped_sim_clock_never_fires() {
        let clock = SimClock::new();
        clock.set(secs(5.0));
        let pending = futures::future::pending::<()>();
        let t = timeout(clock.as_ref(), secs(0.01), pending);
        tokio::pin!(t);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!((&mut t).now_or_never().is_none());
        clock.set(secs(5.01));
        assert_eq!(t.now_or_never(), Some(Err(Elapsed(secs(0.01)))));
    }

    #[tokio::test]
    async fn the_wall_clock_is_the_machine_clock() {
        let w = WallClock;
        let d = w.now().as_secs_f64() - SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(d.abs() < 1.0);
        assert!(!w.is_simulated());
        let t0 = Instant::now();
        w.sleep(Duration::from_millis(10)).await;
        assert!(t0.elapsed() >= Duration::from_millis(10));
    }
}
