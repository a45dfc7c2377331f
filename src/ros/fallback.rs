//! The scheduler's fallback failure detector (I/O around [`crate::fallback::Fallback`]): hears the
//! watchdog's heartbeat, feeds the executors' heartbeats and battery reports the scheduler
//! receives anyway to the same detector core, and hands the declarations that count (only while
//! the watchdog is silent) to the scheduler as if they came from `/aerokv/failures`. Reports the
//! watchdog's health on `/diagnostics` (`aerokv/watchdog/liveness`) and for `stats_json`.
use crate::detector::WatchdogParams;
use crate::fallback::{Change, Fallback, WatchdogHealth};
use crate::ros::auth::NodeAuth;
use crate::ros::{clock, names, now_stamp, NodeContext};
use r2r::aerokv::msg::{FailureEvent, Heartbeat};
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// How often the watchdog beats, and how long a silence makes it dead for the scheduler.
pub const WATCHDOG_HEARTBEAT_PERIOD: Duration = Duration::from_millis(100);
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(1);
const DIAGNOSTICS_PERIOD: Duration = Duration::from_secs(1);

/// What the scheduler feeds the fallback.
pub enum Input {
    Heartbeat(String, u64, Instant),
    Battery(String, f64, Instant),
    Assignment(u64, Vec<String>, Instant),
}

/// The watchdog's state as the scheduler last judged it (for `stats_json`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Status {
    pub watchdog_alive: bool,
    pub watchdog_silent_s: f64,
    /// Failures this scheduler declared itself while the watchdog was silent.
    pub fallback_declarations: u64,
}

pub struct Handle {
    pub tx: UnboundedSender<Input>,
    pub status: Arc<Mutex<Status>>,
}

impl Handle {
    pub fn send(&self, input: Input) {
        let _ = self.tx.send(input);
    }
    pub fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the fallback; its declarations go to `failures`.
pub fn spawn(
    ctx: &NodeContext,
    auth: Arc<NodeAuth>,
    failures: UnboundedSender<FailureEvent>,
) -> anyhow::Result<Handle> {
    let p = WatchdogParams::default();
    let check_period = Duration::from_secs_f64(p.check_period_s);
    let mut beats = ctx.subscribe::<Heartbeat>(names::WATCHDOG_HEARTBEAT, names::telemetry())?;
    let diagnostics = ctx.publisher::<DiagnosticArray>(names::DIAGNOSTICS, r2r::QosProfile::default())?;
    let (tx, mut rx) = unbounded_channel();
    let status = Arc::new(Mutex::new(Status::default()));
    let shutdown = ctx.shutdown();
    let origin = clock::now();
    let secs = move |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
    let mut f = Fallback::new(p, WATCHDOG_TIMEOUT.as_secs_f64(), 0.0);
    let out = status.clone();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut check = clock::interval(check_period);
        let mut report = clock::interval(DIAGNOSTICS_PERIOD);
        loop {
            let changes = tokio::select! {
                _ = &mut shutdown => break,
                Some(hb) = beats.recv() => {
                    if auth.accept_watchdog_heartbeat(&hb) {
                        f.watchdog_heartbeat(secs(clock::now()));
                    }
                    Vec::new()
                }
                Some(input) = rx.recv() => {
                    apply(&mut f, input, secs);
                    Vec::new()
                }
                _ = check.tick() => {
                    // Judge only on what has arrived: take everything queued first.
                    while let Ok(input) = rx.try_recv() {
                        apply(&mut f, input, secs);
                    }
                    while let Ok(hb) = beats.try_recv() {
                        if auth.accept_watchdog_heartbeat(&hb) {
                            f.watchdog_heartbeat(secs(clock::now()));
                        }
                    }
                    f.check(secs(clock::now()))
                }
                _ = report.tick() => {
                    publish_diagnostics(&diagnostics, f.health(secs(clock::now())), f.declared);
                    Vec::new()
                }
            };
            for c in changes {
                match c {
                    Change::WatchdogSilent { silent_s } => tracing::warn!(
                        silent_s,
                        "WATCHDOG SILENT: the scheduler's own failure detector now declares failures"
                    ),
                    Change::WatchdogBack { silent_s } => tracing::warn!(
                        silent_s,
                        "watchdog heard again: its declarations count, the scheduler's no longer"
                    ),
                    Change::Declared(d) => {
                        tracing::warn!(uav = %d.uav, epoch = d.epoch, reason = %d.reason, phi = d.phi, "UAV declared failed by the scheduler (watchdog silent)");
                        let ev = FailureEvent {
                            epoch: d.epoch,
                            uav_id: d.uav,
                            reason: d.reason.as_str().into(),
                            silence_s: d.silence_s.unwrap_or(f64::NAN),
                            stamp: now_stamp(),
                            ..Default::default()
                        };
                        if failures.send(ev).is_err() {
                            return;
                        }
                    }
                }
            }
            let health = f.health(secs(clock::now()));
            let (alive, silent_s) = match health {
                WatchdogHealth::Alive { silent_s } => (true, silent_s),
                WatchdogHealth::Dead { silent_s, .. } => (false, silent_s),
            };
            *out.lock().unwrap_or_else(|e| e.into_inner()) =
                Status { watchdog_alive: alive, watchdog_silent_s: silent_s, fallback_declarations: f.declared };
        }
    });
    Ok(Handle { tx, status })
}

fn apply(f: &mut Fallback, input: Input, secs: impl Fn(Instant) -> f64) {
    match input {
        Input::Heartbeat(uav, seq, at) => f.heartbeat(&uav, seq, secs(at)),
        Input::Battery(uav, energy, at) => f.battery(&uav, energy, secs(at)),
        Input::Assignment(epoch, ring, at) => f.assignment(epoch, ring, secs(at)),
    }
}

fn publish_diagnostics(out: &r2r::Publisher<DiagnosticArray>, health: WatchdogHealth, declared: u64) {
    let (level, message, silent_s) = match health {
        WatchdogHealth::Alive { silent_s } => (DiagnosticStatus::OK as u8, "alive".to_string(), silent_s),
        WatchdogHealth::Dead { silent_s, ever_heard } => (
            DiagnosticStatus::ERROR as u8,
            format!(
                "{} for {silent_s:.1} s: the scheduler declares failures itself",
                if ever_heard { "silent" } else { "never heard" }
            ),
            silent_s,
        ),
    };
    let kv = |k: &str, v: String| KeyValue { key: k.into(), value: v };
    let msg = DiagnosticArray {
        header: r2r::std_msgs::msg::Header { stamp: now_stamp(), frame_id: String::new() },
        status: vec![DiagnosticStatus {
            level,
            name: "aerokv/watchdog/liveness".into(),
            message,
            hardware_id: "aerokv/scheduler".into(),
            values: vec![kv("silent_s", format!("{silent_s:.3}")), kv("fallback_declarations", declared.to_string())],
        }],
    };
    if let Err(e) = out.publish(&msg) {
        tracing::warn!("publish watchdog liveness: {e}");
    }
}
