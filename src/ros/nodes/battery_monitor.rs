//! `battery_monitor`: one per UAV. Publishes remaining energy, power, state of charge and
//! expected remaining tokens on `/<uav>/battery`, and `/diagnostics`. Sources: a built-in
//! discharge simulation (flight power, the executor's reported compute time, TX bytes),
//! `sensor_msgs/BatteryState` (Gazebo via ros_gz_bridge, MAVROS), which takes over when it
//! arrives, or PX4's `px4_msgs/BatteryStatus` over uXRCE-DDS (feature `px4`). Readings are mapped
//! and checked by [`crate::battery`]; refused ones are counted and shown in `/diagnostics`.
use crate::battery::{self, Px4Warning, Reading, Rejected, SocField, Source};
use crate::control::Rejects;
use crate::ros::auth::{NodeAuth, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::diagnostics::Diagnostics;
use crate::ros::{clock, names, now_stamp, NodeContext};
use aerokv_auth::Role;
use r2r::aerokv::msg::{BatteryHealth, Heartbeat};
use r2r::sensor_msgs::msg::BatteryState;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::param_docs;

const FROM_BATTERY_STATE: &str = "sensor_msgs/BatteryState";
const FROM_PX4: &str = "px4_msgs/BatteryStatus";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Defaults to the node's namespace (`/uav3/battery_monitor` -> "uav3").
    pub uav_id: String,
    /// auto (simulate until a BatteryState arrives), simulation, battery_state or px4.
    pub source: Source,
    pub capacity_j: f64,
    pub initial_soc: f64,
    pub flight_power_w: f64,
    /// Inference power at full power; battery-aware scaling applies below 40 % (docs/design.md §4).
    pub inference_power_w: f64,
    pub tx_power_w: f64,
    pub link_rate_bps: f64,
    /// Simulated seconds per wall-clock second (demos drain a battery in minutes).
    pub time_scale: f64,
    pub publish_period_s: f64,
    /// Seconds per token assumed until the executor's heartbeats show the real rate.
    pub token_period_s: f64,
    pub battery_state_topic: String,
    /// "best_effort" (Gazebo bridge, MAVROS) or "reliable".
    pub battery_state_qos: String,
    /// Where a BatteryState's charge is read: percentage (0..1), percent (0..100) or charge.
    pub battery_state_soc: SocField,
    /// PX4's topic, and the vehicle's namespace in a multi-vehicle setup (`px4_1`).
    pub px4_topic: String,
    pub px4_namespace: String,
    /// From this PX4 warning on (low, critical, emergency, failed; never) the UAV has no energy
    /// left for the swarm.
    pub px4_empty_at_warning: Px4Warning,
    /// Keystore directory (docs/security.md); empty: authentication off.
    pub keystore: String,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            uav_id: String::new(),
            source: Source::Auto,
            capacity_j: 2.7e6,
            initial_soc: 1.0,
            flight_power_w: 80.0,
            inference_power_w: 35.0,
            tx_power_w: 2.5,
            link_rate_bps: 20e6,
            time_scale: 1.0,
            publish_period_s: 0.5,
            token_period_s: 0.1,
            battery_state_topic: "battery_state".into(),
            battery_state_qos: "best_effort".into(),
            battery_state_soc: SocField::Percentage,
            px4_topic: "/fmu/out/battery_status".into(),
            px4_namespace: String::new(),
            px4_empty_at_warning: Px4Warning::Emergency,
            keystore: String::new(),
        }
    }
}

impl Params {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            matches!(self.battery_state_qos.as_str(), "best_effort" | "reliable"),
            "parameter `battery_state_qos` must be best_effort or reliable"
        );
        anyhow::ensure!(
            self.capacity_j > 0.0 && self.capacity_j <= battery::MAX_CAPACITY_J,
            "parameter `capacity_j` must be positive and at most {} J (the scheduler refuses more)",
            battery::MAX_CAPACITY_J
        );
        anyhow::ensure!((0.0..=1.0).contains(&self.initial_soc), "parameter `initial_soc` must be within 0..1");
        anyhow::ensure!(
            self.link_rate_bps > 0.0 && self.time_scale > 0.0 && self.publish_period_s > 0.0,
            "parameters `link_rate_bps`, `time_scale` and `publish_period_s` must be positive"
        );
        Ok(())
    }
}

/// Per-token figures learnt from the executor's cumulative heartbeat counters.
#[derive(Default)]
struct ExecutorUsage {
    last: Option<(Instant, Heartbeat)>,
    token_period_s: Option<f64>,
    compute_s_per_token: f64,
    tx_bytes_per_token: f64,
}

pub async fn run(ctx: NodeContext, mut p: Params) -> anyhow::Result<()> {
    p.validate()?;
    if p.uav_id.is_empty() {
        p.uav_id = ctx.namespace.clone();
    }
    anyhow::ensure!(!p.uav_id.is_empty(), "parameter `uav_id` is empty and the node has no namespace");
    let auth = NodeAuth::load(&p.keystore, Role::BatteryMonitor, Some(&p.uav_id))?;
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    let (battery_topic, heartbeat_topic) = (names::battery(&p.uav_id), names::heartbeat(&p.uav_id));
    let health_pub = ctx.publisher::<BatteryHealth>(&battery_topic, names::telemetry())?;
    let diagnostics = Diagnostics::new(&ctx)?;
    let mut live = crate::ros::params::serve(&ctx, p.clone(), param_docs::BATTERY_MONITOR, |p| {
        p.validate().map_err(|e| e.to_string())
    })?;
    let mut heartbeats = ctx.subscribe::<Heartbeat>(&names::heartbeat(&p.uav_id), names::telemetry())?;
    // Every reading, mapped and checked, with the source it came from.
    let (readings_tx, mut readings) = mpsc::unbounded_channel::<(&'static str, Result<Reading, Rejected>)>();
    let mut battery_state = follow_battery_state(&ctx, &p, &readings_tx)?;
    if p.source == Source::Px4 {
        let topic = battery::px4_topic(&p.px4_namespace, &p.px4_topic).map_err(anyhow::Error::msg)?;
        let empty_at = (p.px4_empty_at_warning != Px4Warning::None).then_some(p.px4_empty_at_warning);
        subscribe_px4(&ctx, &topic, empty_at, readings_tx.clone())?;
        tracing::info!(uav = %p.uav_id, %topic, "battery monitor up, following PX4");
    }

    let mut energy_j = p.capacity_j * p.initial_soc;
    let simulated = matches!(p.source, Source::Auto | Source::Simulation);
    let mut external: Option<(Reading, &'static str)> = None;
    let mut rejects = Rejects::default();
    let mut last_rejected: Option<Rejected> = None;
    let mut usage = ExecutorUsage::default();
    let mut last_reading_at: Option<Instant> = None;
    let mut ticker = clock::interval(Duration::from_secs_f64(p.publish_period_s));
    let mut last_tick = clock::now();
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Ok(()) = live.changed() => {
                let new = live.borrow_and_update().clone();
                let input = |p: &Params| (p.battery_state_topic.clone(), p.battery_state_qos.clone(), p.battery_state_soc);
                let moved = input(&new) != input(&p);
                p = Params { uav_id: p.uav_id.clone(), ..new };
                if moved {
                    if let Some(old) = battery_state.take() { old.abort(); }
                    battery_state = follow_battery_state(&ctx, &p, &readings_tx)?;
                }
            }
            Some(hb) = heartbeats.recv() => {
                let now = clock::now();
                if !auth.accept_heartbeat(&heartbeat_topic, &hb) {
                    continue;
                }
                if let Some((t0, prev)) = &usage.last {
                    let d_tokens = hb.kv_tokens.saturating_sub(prev.kv_tokens) as f64;
                    let d_compute = (hb.compute_s_total - prev.compute_s_total).max(0.0);
                    let d_tx = hb.tx_bytes_total.saturating_sub(prev.tx_bytes_total) as f64;
                    if simulated && external.is_none() {
                        // Compute and radio energy of the interval, at the battery-aware power level.
                        let soc = energy_j / p.capacity_j;
                        let compute_w = p.inference_power_w * inference_power_fraction(soc);
                        energy_j -= (compute_w * d_compute + p.tx_power_w * d_tx * 8.0 / p.link_rate_bps) * p.time_scale;
                    }
                    if d_tokens > 0.0 {
                        usage.token_period_s = Some(now.duration_since(*t0).as_secs_f64() / d_tokens);
                        usage.compute_s_per_token = d_compute / d_tokens;
                        usage.tx_bytes_per_token = d_tx / d_tokens;
                    }
                }
                usage.last = Some((now, hb));
            }
            Some((from, reading)) = readings.recv() => match reading {
                Ok(r) => {
                    if external.is_none() { tracing::info!(uav = %p.uav_id, "{from} received: it is now the battery source"); }
                    external = Some((r, from));
                    last_reading_at = Some(clock::now());
                    last_rejected = None;
                }
                Err(why) => {
                    if rejects.note() {
                        tracing::warn!(uav = %p.uav_id, count = rejects.count, "{from} refused, the last good reading stands: {why}");
                    }
                    last_rejected = Some(why);
                }
            },
            _ = ticker.tick() => {
                let now = clock::now();
                let dt = now.saturating_duration_since(last_tick).as_secs_f64();
                last_tick = now;
                let soc;
                let source;
                let power_w;
                let mut capacity_j = p.capacity_j;
                if let Some((r, from)) = &external {
                    capacity_j = r.capacity_j.unwrap_or(p.capacity_j);
                    soc = r.soc;
                    energy_j = soc * capacity_j;
                    power_w = r.power_w.unwrap_or(p.flight_power_w);
                    source = *from;
                } else {
                    if simulated {
                        energy_j -= p.flight_power_w * dt * p.time_scale;
                    }
                    energy_j = energy_j.max(0.0);
                    soc = energy_j / p.capacity_j;
                    let period = usage.token_period_s.unwrap_or(p.token_period_s);
                    power_w = p.flight_power_w + p.inference_power_w * inference_power_fraction(soc) * (usage.compute_s_per_token / period).min(1.0);
                    source = match p.source {
                        Source::BatteryState => FROM_BATTERY_STATE,
                        Source::Px4 => FROM_PX4,
                        Source::Auto | Source::Simulation => "simulation",
                    };
                }
                let period = usage.token_period_s.unwrap_or(p.token_period_s);
                let energy_per_token = p.flight_power_w * period
                    + p.inference_power_w * inference_power_fraction(soc) * usage.compute_s_per_token
                    + p.tx_power_w * usage.tx_bytes_per_token * 8.0 / p.link_rate_bps;
                let expected_tokens = if energy_per_token > 0.0 { energy_j / energy_per_token } else { f64::INFINITY };
                let mut msg = BatteryHealth {
                    uav_id: p.uav_id.clone(),
                    stamp: now_stamp(),
                    energy_j,
                    capacity_j,
                    state_of_charge: soc as f32,
                    power_w,
                    expected_remaining_tokens: expected_tokens,
                    source: source.into(),
                    ..Default::default()
                };
                auth.sign_battery(&battery_topic, &mut msg);
                if let Err(e) = health_pub.publish(&msg) { tracing::warn!("publish battery health: {e}"); }
                let warning = external.as_ref().and_then(|(r, _)| r.warning);
                let age = last_reading_at.map(|t| now.saturating_duration_since(t).as_secs_f64());
                diagnostics.publish(vec![crate::diagnostics::battery(&view(&msg, age, rejects, last_rejected.as_ref(), warning))]);
            }
        }
    }
}

/// What `/diagnostics` shows of the health just published.
fn view(
    h: &BatteryHealth,
    reading_age_s: Option<f64>,
    rejects: Rejects,
    last_rejected: Option<&Rejected>,
    warning: Option<Px4Warning>,
) -> crate::diagnostics::BatteryView {
    crate::diagnostics::BatteryView {
        uav: h.uav_id.clone(),
        source: h.source.clone(),
        reading_age_s,
        energy_j: h.energy_j,
        state_of_charge: h.state_of_charge,
        power_w: h.power_w,
        expected_remaining_tokens: h.expected_remaining_tokens,
        rejected_readings: rejects.count,
        last_rejected: last_rejected.map(|r| r.to_string()),
        px4_warning: warning.map(|w| format!("{w:?}").to_lowercase()),
    }
}

/// Subscribes to the `sensor_msgs/BatteryState` input the parameters name (sources auto and
/// battery_state); the task forwards its readings until aborted (the topic changed).
fn follow_battery_state(
    ctx: &NodeContext,
    p: &Params,
    readings: &mpsc::UnboundedSender<(&'static str, Result<Reading, Rejected>)>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if !matches!(p.source, Source::Auto | Source::BatteryState) {
        return Ok(None);
    }
    let qos =
        if p.battery_state_qos == "reliable" { r2r::QosProfile::default() } else { r2r::QosProfile::sensor_data() };
    let topic = if p.battery_state_topic.starts_with('/') {
        p.battery_state_topic.clone()
    } else {
        format!("/{}/{}", p.uav_id, p.battery_state_topic)
    };
    let mut rx = ctx.subscribe::<BatteryState>(&topic, qos)?;
    let (tx, soc_field) = (readings.clone(), p.battery_state_soc);
    let task = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let _ = tx.send((FROM_BATTERY_STATE, battery::from_battery_state(&battery_state_fields(&m), soc_field)));
        }
    });
    tracing::info!(uav = %p.uav_id, source = ?p.source, %topic, qos = %p.battery_state_qos, "following BatteryState");
    Ok(Some(task))
}

/// Fraction of full inference power the battery allows: the planning core's battery model
/// (docs/design.md §4), so that the monitor and the planner agree.
fn inference_power_fraction(soc: f64) -> f64 {
    aerokv_plan::power_fraction(soc, &aerokv_plan::PowerModel::default())
}

fn battery_state_fields(m: &BatteryState) -> battery::BatteryStateFields {
    battery::BatteryStateFields {
        present: m.present,
        percentage: m.percentage,
        voltage: m.voltage,
        current: m.current,
        charge: m.charge,
        capacity: m.capacity,
    }
}

/// Follows PX4's battery status. PX4 publishes it best effort, transient local, keep last: a
/// reliable subscriber would never match. A best-effort writer hands no history to a late reader
/// (measured with Fast DDS), so a volatile reader loses nothing and also matches a volatile writer.
#[cfg(feature = "px4")]
fn subscribe_px4(
    ctx: &NodeContext,
    topic: &str,
    empty_at: Option<Px4Warning>,
    tx: mpsc::UnboundedSender<(&'static str, Result<Reading, Rejected>)>,
) -> anyhow::Result<()> {
    use r2r::px4_msgs::msg::BatteryStatus;
    let qos = r2r::QosProfile::sensor_data();
    let mut rx = ctx.subscribe::<BatteryStatus>(topic, qos)?;
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let fields = battery::Px4Fields {
                connected: m.connected,
                remaining: m.remaining,
                voltage_v: m.voltage_v,
                current_a: m.current_a,
                warning: m.warning,
                full_charge_capacity_wh: m.full_charge_capacity_wh,
            };
            let _ = tx.send((FROM_PX4, battery::from_px4(&fields, empty_at)));
        }
    });
    Ok(())
}

#[cfg(not(feature = "px4"))]
fn subscribe_px4(
    _: &NodeContext,
    _: &str,
    _: Option<Px4Warning>,
    _: mpsc::UnboundedSender<(&'static str, Result<Reading, Rejected>)>,
) -> anyhow::Result<()> {
    anyhow::bail!("parameter `source` is px4, but this build has no px4_msgs (cargo feature `px4`)")
}
