//! `watchdog`: one per swarm. Watches every UAV's heartbeats and battery health and declares a
//! UAV failed (heartbeats missed for `heartbeat_timeout_s`, or its battery empty) once per UAV
//! and epoch, on `/aerokv/failures`.
use super::discovery::uavs_with_topic;
use crate::ros::auth::{verified, NodeAuth, SignedPublisher, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::{names, now_stamp, NodeContext};
use aerokv_auth::Role;
use r2r::aerokv::msg::{BatteryHealth, FailureEvent, Heartbeat};
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
    /// Keystore directory (docs/security.md); empty: authentication off.
    pub keystore: String,
}

impl Default for Params {
    fn default() -> Self {
        Params { heartbeat_timeout_s: 1.0, check_period_s: 0.05, discovery_period_s: 0.5, keystore: String::new() }
    }
}

enum Seen {
    Heartbeat(Heartbeat),
    Battery(BatteryHealth),
}

pub async fn run(ctx: NodeContext, p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(
        p.heartbeat_timeout_s > 0.0 && p.check_period_s > 0.0 && p.discovery_period_s > 0.0,
        "watchdog periods must be positive"
    );
    let auth = NodeAuth::load(&p.keystore, Role::Watchdog, None)?;
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    let failures =
        SignedPublisher::new(ctx.publisher(names::FAILURES, names::events())?, auth.clone(), NodeAuth::sign_failure);
    let mut assignments =
        verified(ctx.subscribe(names::ASSIGNMENT, names::latched_reader())?, auth, NodeAuth::accept_assignment);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    // The discovery thread ends at the node's shutdown and is joined before the node returns (it
    // must not be inside the node when ROS shuts down).
    let discovery = {
        let (ctx, seen, period) = (ctx.clone(), seen_tx.clone(), Duration::from_secs_f64(p.discovery_period_s));
        tokio::task::spawn_blocking(move || watch_new_uavs(&ctx, &seen, period))
    };
    let mut last_beat: BTreeMap<String, Instant> = BTreeMap::new();
    let mut declared: HashSet<(u64, String)> = HashSet::new();
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
            Some(seen) = seen_rx.recv() => take(seen, &mut last_beat, &failures, &mut declared, epoch),
            _ = check.tick() => {
                // Judge only on what has arrived: take everything queued first.
                while let Ok(seen) = seen_rx.try_recv() {
                    take(seen, &mut last_beat, &failures, &mut declared, epoch);
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
fn take(
    seen: Seen,
    last_beat: &mut BTreeMap<String, Instant>,
    failures: &SignedPublisher<FailureEvent>,
    declared: &mut HashSet<(u64, String)>,
    epoch: u64,
) {
    match seen {
        Seen::Heartbeat(hb) => {
            last_beat.insert(hb.uav_id, Instant::now());
        }
        Seen::Battery(b) if b.energy_j <= 0.0 => {
            declare(failures, declared, epoch, &b.uav_id, "battery_empty", last_beat.get(&b.uav_id))
        }
        Seen::Battery(_) => {}
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
            match forward(ctx, &names::heartbeat(uav), seen, Seen::Heartbeat)
                .and_then(|()| forward(ctx, &names::battery(uav), seen, Seen::Battery))
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
    out: &SignedPublisher<FailureEvent>,
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
    let msg = FailureEvent {
        epoch,
        uav_id: uav.into(),
        reason: reason.into(),
        silence_s,
        stamp: now_stamp(),
        ..Default::default()
    };
    if let Err(e) = out.publish(&msg) {
        tracing::error!("publish failure event: {e}");
    }
}
