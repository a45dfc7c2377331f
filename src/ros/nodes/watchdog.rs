//! `watchdog`: one per swarm. Watches every UAV's heartbeats and battery health; the decisions
//! (accrual failure detection, suspicion, declaration once per UAV and epoch) are the core's
//! [`Watchdog`]. Declarations go to `/aerokv/failures`, every UAV's state (alive, suspected with
//! its phi, declared) to `/diagnostics` and the log.
use super::discovery::uavs_with_topic;
use crate::control::{self, TelemetryKind, TelemetryRejects};
use crate::detector::{Event, Health, UavReport, Watchdog, WatchdogParams};
use crate::params::{Checked, Validate};
use crate::ros::auth::{verified, NodeAuth, SignedPublisher, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::diagnostics::Diagnostics;
use crate::ros::fallback::WATCHDOG_HEARTBEAT_PERIOD;
use crate::ros::{clock, convert, names, now_stamp, stamp_secs, unix_now, NodeContext};
use aerokv_auth::Role;
use r2r::aerokv::msg::{BatteryHealth, FailureEvent, Heartbeat};
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::param_docs;
use tokio::sync::mpsc;

/// The watchdog's parameters, checked when the file is read.
pub type Params = Checked<WatchdogParams>;

/// How often every UAV's state goes to `/diagnostics` (and at every change).
const DIAGNOSTICS_PERIOD: Duration = Duration::from_secs(1);

/// A message from a UAV's topic (the UAV the topic belongs to), stamped on receipt: the check
/// loop may be busy.
enum Seen {
    Heartbeat(String, Heartbeat, Instant),
    Battery(String, BatteryHealth, Instant),
}

pub async fn run(ctx: NodeContext, Checked(p): Params) -> anyhow::Result<()> {
    let auth = NodeAuth::load(&p.keystore, Role::Watchdog, None)?;
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    let failures =
        SignedPublisher::new(ctx.publisher(names::FAILURES, names::events())?, auth.clone(), NodeAuth::sign_failure);
    let diagnostics = ctx.publisher::<DiagnosticArray>(names::DIAGNOSTICS, r2r::QosProfile::default())?;
    let summary = Diagnostics::new(&ctx)?;
    let mut live =
        crate::ros::params::serve(&ctx, p.clone(), param_docs::WATCHDOG, |p| p.validate().map_err(|e| e.to_string()))?;
    let mut assignments =
        verified(ctx.subscribe(names::ASSIGNMENT, names::latched_reader())?, auth.clone(), NodeAuth::accept_assignment);
    // Its own heartbeat: the scheduler notices the watchdog's death (docs/security.md §5).
    let beat_pub = ctx.publisher::<Heartbeat>(names::WATCHDOG_HEARTBEAT, names::heartbeat_qos())?;
    let mut beat = clock::interval(WATCHDOG_HEARTBEAT_PERIOD);
    let mut sequence = 0;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    // The discovery thread ends at the node's shutdown and is joined before the node returns (it
    // must not be inside the node when ROS shuts down).
    let discovery = {
        let (ctx, seen, period) = (ctx.clone(), seen_tx.clone(), Duration::from_secs_f64(p.discovery_period_s));
        let auth = auth.clone();
        tokio::task::spawn_blocking(move || watch_new_uavs(&ctx, &auth, &seen, period))
    };
    let origin = clock::now();
    let secs = |t: Instant| t.saturating_duration_since(origin).as_secs_f64();
    let mut rejects = TelemetryRejects::default();
    let mut check = clock::interval(Duration::from_secs_f64(p.check_period_s));
    let mut report = clock::interval(DIAGNOSTICS_PERIOD);
    tracing::info!(?p, "watchdog up");
    let mut w = Watchdog::new(p);
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    loop {
        let events = tokio::select! {
            _ = &mut shutdown => break,
            Ok(()) = live.changed() => {
                w.set_params(live.borrow_and_update().clone());
                Vec::new()
            }
            Some(a) = assignments.recv() => {
                w.assignment(a.epoch, a.ring, secs(clock::now()));
                Vec::new()
            }
            Some(seen) = seen_rx.recv() => take(&mut w, &mut rejects, seen, secs),
            _ = check.tick() => {
                // Judge only on what has arrived: take everything queued first.
                let mut events = Vec::new();
                while let Ok(seen) = seen_rx.try_recv() {
                    events.extend(take(&mut w, &mut rejects, seen, secs));
                }
                events.extend(w.check(secs(clock::now())));
                events
            }
            _ = report.tick() => {
                let reports = w.report(secs(clock::now()));
                publish_diagnostics(&diagnostics, &reports);
                summary.publish(vec![crate::diagnostics::watchdog(&view(&w, &reports, &rejects))]);
                Vec::new()
            }
            _ = beat.tick() => {
                sequence += 1;
                let mut hb = Heartbeat { uav_id: "watchdog".into(), epoch: w.epoch(), sequence, state: "watching".into(), stamp: now_stamp(), ..Default::default() };
                auth.sign_heartbeat(names::WATCHDOG_HEARTBEAT, &mut hb);
                if let Err(e) = beat_pub.publish(&hb) { tracing::warn!("publish the watchdog's heartbeat: {e}"); }
                Vec::new()
            }
        };
        let changed = events.iter().any(|e| !matches!(e, Event::Stalled { .. }));
        for e in events {
            publish_event(&failures, e);
        }
        if changed {
            publish_diagnostics(&diagnostics, &w.report(secs(clock::now())));
        }
    }
    // What the heartbeats looked like (e.g. their inter-arrival p99 while KV snapshots were sent).
    for r in w.report(secs(clock::now())) {
        tracing::info!(uav = %r.uav, samples = r.samples, p50_ms = r.p50_s * 1e3, p99_ms = r.p99_s * 1e3, max_gap_ms = r.max_gap_s * 1e3, period_ms = r.model.period_s * 1e3, loss = r.model.loss, jitter_ms = r.model.std_dev_s * 1e3, "heartbeat inter-arrivals");
    }
    let _ = discovery.await;
    Ok(())
}

/// A heartbeat or battery report for the detector. Reports that fail their check (another UAV's
/// name, non-finite or absurd figures) are counted and change nothing.
fn take(w: &mut Watchdog, rejects: &mut TelemetryRejects, seen: Seen, secs: impl Fn(Instant) -> f64) -> Vec<Event> {
    // The watchdog loads no model: any interval length passes here (the scheduler checks them).
    let (uav, kind, checked) = match &seen {
        Seen::Heartbeat(uav, hb, _) => {
            (uav, TelemetryKind::Heartbeat, control::validate_heartbeat(&convert::heartbeat_fields(hb), uav, u32::MAX))
        }
        Seen::Battery(uav, b, _) => (
            uav,
            TelemetryKind::BatteryHealth,
            control::validate_battery_health(&convert::battery_health_fields(b), uav),
        ),
    };
    if !rejects.passed(uav, kind, checked) {
        return Vec::new();
    }
    match seen {
        Seen::Heartbeat(_, hb, at) => {
            let events = w.heartbeat(&hb.uav_id, hb.sequence, secs(at));
            if events.iter().any(|e| matches!(e, Event::Heard { .. })) {
                // Late at the sender or on the way? (Same clock on one machine; a guide elsewhere.)
                let transit_ms = (unix_now() - stamp_secs(&hb.stamp)) * 1e3;
                tracing::info!(uav = %hb.uav_id, sequence = hb.sequence, transit_ms, "heartbeat after a silence");
            }
            events
        }
        Seen::Battery(_, b, at) => w.battery(&b.uav_id, b.energy_j, secs(at)).into_iter().collect(),
    }
}

/// The watchdog's own status: the plan's ring, who is watched, suspected, declared.
fn view(w: &Watchdog, reports: &[UavReport], rejects: &TelemetryRejects) -> crate::diagnostics::WatchdogView {
    let with = |h: Health| reports.iter().filter(|r| r.health == h).map(|r| r.uav.clone()).collect();
    crate::diagnostics::WatchdogView {
        epoch: w.epoch(),
        ring: w.ring().map(|r| r.iter().cloned().collect()).unwrap_or_default(),
        watched: reports.iter().map(|r| r.uav.clone()).collect(),
        suspected: with(Health::Suspected),
        declared: with(Health::Declared),
        telemetry_refused: rejects.total(),
    }
}

/// Logs an event; a declaration is also published.
fn publish_event(out: &SignedPublisher<FailureEvent>, event: Event) {
    match event {
        Event::Suspected { uav, phi, silence_s } => {
            tracing::warn!(%uav, phi, silence_s, "UAV suspected (no recovery unless declared)")
        }
        Event::Heard { uav, was, silence_s } => tracing::info!(%uav, was = was.as_str(), silence_s, "UAV heard again"),
        Event::Stalled { lag_s } => {
            tracing::warn!(lag_s, "watchdog was not listening; not counting that time as silence")
        }
        Event::Declared(d) => {
            let silence_s = d.silence_s.unwrap_or(f64::NAN);
            tracing::warn!(uav = %d.uav, epoch = d.epoch, reason = %d.reason, evidence = ?d.evidence, phi = d.phi, silence_s, "UAV declared failed");
            let msg = FailureEvent {
                epoch: d.epoch,
                uav_id: d.uav,
                reason: d.reason.as_str().into(),
                silence_s,
                stamp: now_stamp(),
                ..Default::default()
            };
            if let Err(e) = out.publish(&msg) {
                tracing::error!("publish failure event: {e}");
            }
        }
    }
}

/// Every UAV's state on `/diagnostics`: OK alive, WARN suspected, ERROR declared, with phi and
/// the model behind it.
fn publish_diagnostics(out: &r2r::Publisher<DiagnosticArray>, uavs: &[UavReport]) {
    if uavs.is_empty() {
        return; // nothing heard yet: an empty array tells a diagnostics reader nothing
    }
    let kv = |k: &str, v: String| KeyValue { key: k.into(), value: v };
    let status = uavs
        .iter()
        .map(|r| {
            let (level, message) = match r.health {
                Health::Alive => (DiagnosticStatus::OK as u8, "alive".to_string()),
                Health::Suspected => (DiagnosticStatus::WARN as u8, format!("suspected: phi {:.1}", r.phi)),
                Health::Declared => (DiagnosticStatus::ERROR as u8, "declared failed".to_string()),
            };
            DiagnosticStatus {
                level,
                name: format!("aerokv/{}/heartbeat", r.uav),
                message,
                hardware_id: r.uav.clone(),
                values: vec![
                    kv("phi", format!("{:.2}", r.phi)),
                    kv("silence_s", format!("{:.3}", r.silence_s)),
                    kv("period_s", format!("{:.4}", r.model.period_s)),
                    kv("loss", format!("{:.4}", r.model.loss)),
                    kv("jitter_s", format!("{:.4}", r.model.std_dev_s)),
                    kv("inter_arrival_p99_s", format!("{:.4}", r.p99_s)),
                ],
            }
        })
        .collect();
    let msg =
        DiagnosticArray { header: r2r::std_msgs::msg::Header { stamp: now_stamp(), frame_id: String::new() }, status };
    if let Err(e) = out.publish(&msg) {
        tracing::warn!("publish diagnostics: {e}");
    }
}

/// Subscribes to the heartbeats and battery health of every UAV that appears. Runs on a blocking
/// thread of its own: discovery waits for the node lock (up to one spin timeout), and in the
/// check loop that wait postponed declarations.
fn watch_new_uavs(ctx: &NodeContext, auth: &Arc<NodeAuth>, seen: &mpsc::UnboundedSender<Seen>, period: Duration) {
    let runtime = tokio::runtime::Handle::current();
    let mut watched = BTreeSet::new();
    loop {
        for uav in uavs_with_topic(ctx, "heartbeat").union(&uavs_with_topic(ctx, "battery")) {
            if watched.contains(uav) {
                continue;
            }
            match forward(ctx, auth, &names::heartbeat(uav), uav, seen, NodeAuth::accept_heartbeat, Seen::Heartbeat)
                .and_then(|()| {
                    forward(ctx, auth, &names::battery(uav), uav, seen, NodeAuth::accept_battery, Seen::Battery)
                }) {
                Ok(()) => {
                    tracing::info!(%uav, "watching");
                    watched.insert(uav.clone());
                }
                Err(e) => tracing::error!(%uav, "cannot watch: {e:#}"),
            }
        }
        if runtime.block_on(clock::timeout(period, ctx.shutdown())).is_ok() {
            return;
        }
    }
}

/// Forwards `uav`'s heartbeats or battery reports from `topic` (those signed by that UAV's node),
/// with the topic's UAV, stamped on receipt.
fn forward<T: r2r::WrappedTypesupport + Send + 'static>(
    ctx: &NodeContext,
    auth: &Arc<NodeAuth>,
    topic: &str,
    uav: &str,
    tx: &mpsc::UnboundedSender<Seen>,
    accept: fn(&NodeAuth, &str, &T) -> bool,
    wrap: fn(String, T, Instant) -> Seen,
) -> anyhow::Result<()> {
    let mut rx = ctx.subscribe::<T>(topic, names::telemetry())?;
    let (tx, uav, auth, topic) = (tx.clone(), uav.to_string(), auth.clone(), topic.to_string());
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if !accept(&auth, &topic, &m) {
                continue;
            }
            if tx.send(wrap(uav.clone(), m, clock::now())).is_err() {
                break;
            }
        }
    });
    Ok(())
}
