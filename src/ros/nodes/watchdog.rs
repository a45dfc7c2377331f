//! `watchdog`: one per swarm. Watches every UAV's heartbeats and battery health and declares a
//! UAV failed (heartbeats missed for `heartbeat_timeout_s`, or its battery empty) once per UAV
//! and epoch, on `/aerokv/failures`.
use super::discovery::uavs_with_topic;
use crate::control::{self, TelemetryKind, TelemetryRejects};
use crate::ros::{convert, names, now_stamp, NodeContext};
use r2r::aerokv::msg::{Assignment, BatteryHealth, FailureEvent, Heartbeat};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    pub heartbeat_timeout_s: f64,
    pub check_period_s: f64,
    /// How often to look for new UAV topics (new members).
    pub discovery_period_s: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params { heartbeat_timeout_s: 1.0, check_period_s: 0.05, discovery_period_s: 0.5 }
    }
}

/// A message from a UAV's topic, with the UAV the topic belongs to.
enum Seen {
    Heartbeat(String, Heartbeat),
    Battery(String, BatteryHealth),
}

pub async fn run(ctx: NodeContext, p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.heartbeat_timeout_s > 0.0 && p.check_period_s > 0.0 && p.discovery_period_s > 0.0,
        "watchdog periods must be positive"
    );
    let failures = ctx.publisher::<FailureEvent>(names::FAILURES, names::events())?;
    let mut assignments = ctx.subscribe::<Assignment>(names::ASSIGNMENT, names::latched())?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    // The discovery thread ends at the node's shutdown and is joined before the node returns (it
    // must not be inside the node when ROS shuts down).
    let discovery = {
        let (ctx, seen, period) = (ctx.clone(), seen_tx.clone(), Duration::from_secs_f64(p.discovery_period_s));
        tokio::task::spawn_blocking(move || watch_new_uavs(&ctx, &seen, period))
    };
    let mut last_beat: BTreeMap<String, Instant> = BTreeMap::new();
    let mut declared: HashSet<(u64, String)> = HashSet::new();
    let mut rejects = TelemetryRejects::default();
    let mut epoch = 0u64;
    let mut ring: Option<BTreeSet<String>> = None;
    let mut check = tokio::time::interval(Duration::from_secs_f64(p.check_period_s));
    let timeout = Duration::from_secs_f64(p.heartbeat_timeout_s);
    let mut last_check = Instant::now();
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    tracing::info!(timeout_s = p.heartbeat_timeout_s, "watchdog up");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(a) = assignments.recv() => {
                epoch = epoch.max(a.epoch);
                ring = Some(a.ring.iter().cloned().collect());
            }
            Some(seen) = seen_rx.recv() => take(seen, &mut last_beat, &failures, &mut declared, &mut rejects, epoch),
            _ = check.tick() => {
                // Judge only on what has arrived: take everything queued first.
                while let Ok(seen) = seen_rx.try_recv() {
                    take(seen, &mut last_beat, &failures, &mut declared, &mut rejects, epoch);
                }
                // If this loop itself was held up (a stalled process, a starved CPU), the time it
                // was not listening is nobody's silence.
                let lag = last_check.elapsed().saturating_sub(Duration::from_secs_f64(p.check_period_s));
                last_check = Instant::now();
                if lag > timeout / 4 {
                    tracing::warn!(lag_s = lag.as_secs_f64(), "watchdog was not listening; not counting that time as silence");
                    for t in last_beat.values_mut() {
                        *t += lag;
                    }
                    continue;
                }
                for (uav, t) in &last_beat {
                    // Only members of the current plan can fail; others are not serving.
                    let member = ring.as_ref().is_none_or(|r| r.contains(uav));
                    if member && t.elapsed() > timeout {
                        declare(&failures, &mut declared, epoch, uav, "heartbeat_timeout", Some(t));
                    }
                }
            }
        }
    }
    let _ = discovery.await;
    Ok(())
}

/// A heartbeat or battery report: note when the UAV was heard; an empty battery is a failure.
/// Reports that fail their check (another UAV's name, non-finite or absurd figures) are counted
/// and change nothing.
fn take(
    seen: Seen,
    last_beat: &mut BTreeMap<String, Instant>,
    failures: &r2r::Publisher<FailureEvent>,
    declared: &mut HashSet<(u64, String)>,
    rejects: &mut TelemetryRejects,
    epoch: u64,
) {
    // The watchdog loads no model: any interval length passes here (the scheduler checks them).
    let (uav, kind, checked) = match &seen {
        Seen::Heartbeat(uav, hb) => {
            (uav, TelemetryKind::Heartbeat, control::validate_heartbeat(&convert::heartbeat_fields(hb), uav, u32::MAX))
        }
        Seen::Battery(uav, b) => (
            uav,
            TelemetryKind::BatteryHealth,
            control::validate_battery_health(&convert::battery_health_fields(b), uav),
        ),
    };
    if !rejects.passed(uav, kind, checked) {
        return;
    }
    match seen {
        Seen::Heartbeat(uav, _) => {
            last_beat.insert(uav, Instant::now());
        }
        Seen::Battery(uav, b) if control::is_depleted(&convert::battery_health_fields(&b)) => {
            declare(failures, declared, epoch, &uav, "battery_empty", last_beat.get(&uav))
        }
        Seen::Battery(..) => {}
    }
}

/// Subscribes to the heartbeats and battery health of every UAV that appears. Runs on a blocking
/// thread of its own: discovery waits for the node lock (up to one spin timeout), and in the
/// check loop that wait postponed declarations.
fn watch_new_uavs(ctx: &NodeContext, seen: &mpsc::UnboundedSender<Seen>, period: Duration) {
    let runtime = tokio::runtime::Handle::current();
    let mut watched = BTreeSet::new();
    loop {
        for uav in uavs_with_topic(ctx, "heartbeat").union(&uavs_with_topic(ctx, "battery")) {
            if watched.contains(uav) {
                continue;
            }
            let (u, v) = (uav.clone(), uav.clone());
            match forward(ctx, &names::heartbeat(uav), seen, move |m| Seen::Heartbeat(u.clone(), m))
                .and_then(|()| forward(ctx, &names::battery(uav), seen, move |m| Seen::Battery(v.clone(), m)))
            {
                Ok(()) => {
                    tracing::info!(%uav, "watching");
                    watched.insert(uav.clone());
                }
                Err(e) => tracing::error!(%uav, "cannot watch: {e:#}"),
            }
        }
        if runtime.block_on(tokio::time::timeout(period, ctx.shutdown())).is_ok() {
            return;
        }
    }
}

fn forward<T, F>(ctx: &NodeContext, topic: &str, tx: &mpsc::UnboundedSender<Seen>, wrap: F) -> anyhow::Result<()>
where
    T: r2r::WrappedTypesupport + Send + 'static,
    F: Fn(T) -> Seen + Send + 'static,
{
    let mut rx = ctx.subscribe::<T>(topic, names::telemetry())?;
    let tx = tx.clone();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if tx.send(wrap(m)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

fn declare(
    out: &r2r::Publisher<FailureEvent>,
    declared: &mut HashSet<(u64, String)>,
    epoch: u64,
    uav: &str,
    reason: &str,
    last_beat: Option<&Instant>,
) {
    if !declared.insert((epoch, uav.to_string())) {
        return;
    }
    let silence_s = last_beat.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    tracing::warn!(%uav, epoch, reason, silence_s, "UAV declared failed");
    let msg = FailureEvent { epoch, uav_id: uav.into(), reason: reason.into(), silence_s, stamp: now_stamp() };
    if let Err(e) = out.publish(&msg) {
        tracing::error!("publish failure event: {e}");
    }
}
