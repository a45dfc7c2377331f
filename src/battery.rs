//! The battery monitor's decisions, without ROS: which source it follows, how a reading of
//! `sensor_msgs/BatteryState` or PX4's `px4_msgs/BatteryStatus` maps to the charge it publishes,
//! and which readings it refuses. A refused reading changes nothing: the monitor keeps the last
//! good one, counts the refusal and says why (a broken sensor must not read as an empty battery,
//! which would take a UAV out of the plan, nor as a full one).
use serde::Deserialize;

/// Larger than any UAV battery (27.8 kWh): a capacity above it is a unit error or garbage.
pub const MAX_CAPACITY_J: f64 = 1e8;
/// Larger than any UAV's draw (100 kW).
pub const MAX_POWER_W: f64 = 1e5;
/// Rounding slack of a charge ratio (charge / capacity) above 1.
const RATIO_SLACK: f64 = 1e-3;

/// Where the battery monitor takes the battery from (parameter `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Simulate the discharge until a `sensor_msgs/BatteryState` arrives, then follow it.
    Auto,
    Simulation,
    /// `sensor_msgs/BatteryState` (Gazebo through ros_gz_bridge, MAVROS).
    BatteryState,
    /// PX4's `px4_msgs/BatteryStatus` over uXRCE-DDS.
    Px4,
}

/// Which field of a `sensor_msgs/BatteryState` gives the state of charge (parameter
/// `battery_state_soc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SocField {
    /// `percentage`, 0..1 as sensor_msgs defines it (MAVROS).
    Percentage,
    /// `percentage` in 0..100, as Gazebo's LinearBatteryPlugin fills it unless `fix_issue_225`.
    Percent,
    /// `charge / capacity` (both Ah): right with either Gazebo setting.
    Charge,
}

/// PX4's `warning` levels (`BATTERY_WARNING_*`), in order of severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Px4Warning {
    /// No warning; as the parameter `px4_empty_at_warning`: never.
    #[serde(rename = "never")]
    None = 0,
    Low = 1,
    /// Return or abort now.
    Critical = 2,
    /// Land now.
    Emergency = 3,
    /// The battery has failed.
    Failed = 4,
}

impl Px4Warning {
    /// A known level; PX4's other values (unhealthy 6, charging 7, ...) are not warnings of charge.
    pub fn from_px4(level: u8) -> Option<Px4Warning> {
        [Px4Warning::None, Px4Warning::Low, Px4Warning::Critical, Px4Warning::Emergency, Px4Warning::Failed]
            .into_iter()
            .find(|w| *w as u8 == level)
    }
}

/// Why a reading was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("{field} is not a number ({value})")]
    NotFinite { field: &'static str, value: f64 },
    #[error("{field} is negative ({value})")]
    Negative { field: &'static str, value: f64 },
    #[error("state of charge {value} is outside 0..1")]
    ChargeOutOfRange { value: f64 },
    #[error("{field} {value} is beyond any UAV battery (at most {limit})")]
    Absurd { field: &'static str, value: f64, limit: f64 },
    #[error("capacity is 0")]
    ZeroCapacity,
    #[error("no battery is connected")]
    Disconnected,
}

/// What a good reading says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// State of charge the planner may use, 0..1.
    pub soc: f64,
    /// Measured draw, W (unknown: none).
    pub power_w: Option<f64>,
    /// Capacity the battery reports, J (unknown: none; the monitor's `capacity_j` then).
    pub capacity_j: Option<f64>,
    /// PX4's warning level, for `/diagnostics`.
    pub warning: Option<Px4Warning>,
}

/// The fields of a `sensor_msgs/BatteryState` the monitor reads. Per sensor_msgs, NaN means
/// "not measured" for voltage, current, charge and capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatteryStateFields {
    pub present: bool,
    pub percentage: f32,
    pub voltage: f32,
    pub current: f32,
    pub charge: f32,
    pub capacity: f32,
}

/// The fields of a PX4 v1.15 `BatteryStatus` the monitor reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Px4Fields {
    pub connected: bool,
    /// 1..0, -1 when unknown.
    pub remaining: f32,
    /// V, 0 when unknown.
    pub voltage_v: f32,
    /// A, -1 when unknown.
    pub current_a: f32,
    pub warning: u8,
    /// Wh, 0 when unknown (smart batteries fill it).
    pub full_charge_capacity_wh: f32,
}

fn finite(field: &'static str, value: f32) -> Result<f64, Rejected> {
    let v = f64::from(value);
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Rejected::NotFinite { field, value: v })
    }
}

fn non_negative(field: &'static str, value: f32) -> Result<f64, Rejected> {
    let v = finite(field, value)?;
    if v < 0.0 {
        Err(Rejected::Negative { field, value: v })
    } else {
        Ok(v)
    }
}

fn soc_in_range(value: f64) -> Result<f64, Rejected> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(Rejected::ChargeOutOfRange { value })
    }
}

fn at_most(field: &'static str, value: f64, limit: f64) -> Result<f64, Rejected> {
    if value > limit {
        Err(Rejected::Absurd { field, value, limit })
    } else {
        Ok(value)
    }
}

/// |voltage x current|, when both are known.
fn power(voltage: f64, current: f64) -> Result<Option<f64>, Rejected> {
    if !(voltage.is_finite() && current.is_finite()) {
        return Ok(None);
    }
    at_most("power_w", (voltage * current).abs(), MAX_POWER_W).map(|p| (p > 0.0).then_some(p))
}

/// A `sensor_msgs/BatteryState`'s charge, with the state of charge taken from `soc_field`.
pub fn from_battery_state(m: &BatteryStateFields, soc_field: SocField) -> Result<Reading, Rejected> {
    if !m.present {
        return Err(Rejected::Disconnected);
    }
    let soc = match soc_field {
        SocField::Percentage => soc_in_range(finite("percentage", m.percentage)?)?,
        SocField::Percent => soc_in_range(finite("percentage", m.percentage)? / 100.0)?,
        SocField::Charge => {
            let charge = non_negative("charge", m.charge)?;
            let capacity = non_negative("capacity", m.capacity)?;
            if capacity == 0.0 {
                return Err(Rejected::ZeroCapacity);
            }
            let ratio = charge / capacity;
            soc_in_range(if ratio > 1.0 && ratio <= 1.0 + RATIO_SLACK { 1.0 } else { ratio })?
        }
    };
    let voltage = f64::from(m.voltage);
    if voltage < 0.0 {
        return Err(Rejected::Negative { field: "voltage", value: voltage });
    }
    // sensor_msgs: negative current is discharge; the draw is its magnitude.
    Ok(Reading { soc, power_w: power(voltage, f64::from(m.current))?, capacity_j: None, warning: None })
}

/// A PX4 `BatteryStatus`'s charge. At `empty_at` or a worse warning the autopilot is landing
/// (or its battery failed): the UAV has no energy left for the swarm and reports 0, which takes
/// it out of the plan; `None` never does.
pub fn from_px4(m: &Px4Fields, empty_at: Option<Px4Warning>) -> Result<Reading, Rejected> {
    if !m.connected {
        return Err(Rejected::Disconnected);
    }
    let remaining = non_negative("remaining", m.remaining)?;
    let mut soc = soc_in_range(remaining)?;
    let voltage = non_negative("voltage_v", m.voltage_v)?;
    let current = finite("current_a", m.current_a)?;
    // PX4 reports -1 for an unknown current and 0 V for an unknown voltage.
    let power_w = if current < 0.0 || voltage == 0.0 { None } else { power(voltage, current)? };
    let wh = finite("full_charge_capacity_wh", m.full_charge_capacity_wh)?;
    let capacity_j =
        if wh > 0.0 { Some(at_most("full_charge_capacity_wh", wh * 3600.0, MAX_CAPACITY_J)?) } else { None };
    let warning = Px4Warning::from_px4(m.warning);
    if empty_at.is_some_and(|level| warning.is_some_and(|w| w >= level)) {
        soc = 0.0;
    }
    Ok(Reading { soc, power_w, capacity_j, warning })
}

/// The topic of PX4's battery status for a vehicle: PX4 prefixes every topic with its namespace
/// in a multi-vehicle setup (`px4_1` -> `/px4_1/fmu/out/battery_status`).
pub fn px4_topic(namespace: &str, topic: &str) -> Result<String, String> {
    let ns = namespace.trim_matches('/');
    let topic = topic.trim_start_matches('/');
    let valid = |s: &str| {
        s.split('/').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    };
    if topic.is_empty() || !valid(topic) || (!ns.is_empty() && !valid(ns)) {
        return Err(format!("`{namespace}` + `{topic}` is not a ROS topic name"));
    }
    Ok(if ns.is_empty() { format!("/{topic}") } else { format!("/{ns}/{topic}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bs(percentage: f32) -> BatteryStateFields {
        BatteryStateFields {
            present: true,
            percentage,
            voltage: 14.8,
            current: -10.0,
            charge: f32::NAN,
            capacity: f32::NAN,
        }
    }

    fn px4(remaining: f32) -> Px4Fields {
        Px4Fields {
            connected: true,
            remaining,
            voltage_v: 15.2,
            current_a: 12.0,
            warning: 0,
            full_charge_capacity_wh: 0.0,
        }
    }

    #[test]
    fn battery_state_percentage_maps_to_charge_and_draw() {
        let r = from_battery_state(&bs(0.42), SocField::Percentage).unwrap();
        assert!((r.soc - 0.42).abs() < 1e-6 && (r.power_w.unwrap() - 148.0).abs() < 1e-3, "{r:?}");
        // Unmeasured voltage: no draw, the reading still counts.
        let r = from_battery_state(&BatteryStateFields { voltage: f32::NAN, ..bs(0.5) }, SocField::Percentage).unwrap();
        assert_eq!(r.power_w, None);
        let r = from_battery_state(&bs(42.0), SocField::Percent).unwrap();
        assert!((r.soc - 0.42).abs() < 1e-6);
        let charge = BatteryStateFields { charge: 1.5, capacity: 2.0, ..bs(f32::NAN) };
        assert!((from_battery_state(&charge, SocField::Charge).unwrap().soc - 0.75).abs() < 1e-9);
        let full = BatteryStateFields { charge: 2.0005, capacity: 2.0, ..bs(f32::NAN) };
        assert_eq!(from_battery_state(&full, SocField::Charge).unwrap().soc, 1.0);
    }

    #[test]
    fn bad_battery_states_are_refused_with_the_reason_never_read_as_empty() {
        let refused = |m: BatteryStateFields, f: SocField| from_battery_state(&m, f).unwrap_err();
        assert!(matches!(refused(bs(f32::NAN), SocField::Percentage), Rejected::NotFinite { field: "percentage", .. }));
        assert!(matches!(refused(bs(-0.1), SocField::Percentage), Rejected::ChargeOutOfRange { .. }));
        // Gazebo's 0..100 read as a fraction: out of range, not a full battery.
        assert!(matches!(refused(bs(42.0), SocField::Percentage), Rejected::ChargeOutOfRange { .. }));
        assert!(matches!(refused(bs(f32::INFINITY), SocField::Percent), Rejected::NotFinite { .. }));
        let zero = BatteryStateFields { charge: 1.0, capacity: 0.0, ..bs(0.5) };
        assert_eq!(refused(zero, SocField::Charge), Rejected::ZeroCapacity);
        let over = BatteryStateFields { charge: 3.0, capacity: 2.0, ..bs(0.5) };
        assert!(matches!(refused(over, SocField::Charge), Rejected::ChargeOutOfRange { .. }));
        let negative = BatteryStateFields { charge: -1.0, capacity: 2.0, ..bs(0.5) };
        assert!(matches!(refused(negative, SocField::Charge), Rejected::Negative { field: "charge", .. }));
        let unknown = BatteryStateFields { capacity: f32::NAN, charge: 1.0, ..bs(0.5) };
        assert!(matches!(refused(unknown, SocField::Charge), Rejected::NotFinite { field: "capacity", .. }));
        let absurd = BatteryStateFields { voltage: 1e4, current: -1e3, ..bs(0.5) };
        assert!(matches!(refused(absurd, SocField::Percentage), Rejected::Absurd { field: "power_w", .. }));
        let reversed = BatteryStateFields { voltage: -12.0, ..bs(0.5) };
        assert!(matches!(refused(reversed, SocField::Percentage), Rejected::Negative { field: "voltage", .. }));
        assert_eq!(
            refused(BatteryStateFields { present: false, ..bs(0.5) }, SocField::Percentage),
            Rejected::Disconnected
        );
    }

    #[test]
    fn px4_remaining_connected_and_warning_map_to_charge() {
        let r = from_px4(&px4(0.42), Some(Px4Warning::Emergency)).unwrap();
        assert!((r.soc - 0.42).abs() < 1e-6 && (r.power_w.unwrap() - 182.4).abs() < 1e-3, "{r:?}");
        assert_eq!((r.capacity_j, r.warning), (None, Some(Px4Warning::None)));
        // Unknown current (-1) or voltage (0): no draw.
        assert_eq!(from_px4(&Px4Fields { current_a: -1.0, ..px4(0.5) }, None).unwrap().power_w, None);
        assert_eq!(from_px4(&Px4Fields { voltage_v: 0.0, ..px4(0.5) }, None).unwrap().power_w, None);
        // A smart battery's capacity replaces the configured one.
        let smart = from_px4(&Px4Fields { full_charge_capacity_wh: 100.0, ..px4(0.5) }, None).unwrap();
        assert_eq!(smart.capacity_j, Some(360_000.0));
        // Below the chosen level a warning is only reported; at or above it the UAV has nothing left.
        let low = from_px4(&Px4Fields { warning: 1, ..px4(0.3) }, Some(Px4Warning::Emergency)).unwrap();
        assert!((low.soc - 0.3).abs() < 1e-6 && low.warning == Some(Px4Warning::Low));
        for level in [3, 4] {
            let landing = from_px4(&Px4Fields { warning: level, ..px4(0.3) }, Some(Px4Warning::Emergency)).unwrap();
            assert_eq!(landing.soc, 0.0);
            assert!((from_px4(&Px4Fields { warning: level, ..px4(0.3) }, None).unwrap().soc - 0.3).abs() < 1e-6);
        }
        // Charging (7) is no warning of charge.
        assert_eq!(from_px4(&Px4Fields { warning: 7, ..px4(0.3) }, Some(Px4Warning::Low)).unwrap().warning, None);
    }

    #[test]
    fn bad_px4_statuses_are_refused_with_the_reason() {
        let refused = |m: Px4Fields| from_px4(&m, Some(Px4Warning::Emergency)).unwrap_err();
        assert!(matches!(refused(px4(-1.0)), Rejected::Negative { field: "remaining", .. }));
        assert!(matches!(refused(px4(f32::NAN)), Rejected::NotFinite { field: "remaining", .. }));
        assert!(matches!(refused(px4(1.5)), Rejected::ChargeOutOfRange { .. }));
        assert_eq!(refused(Px4Fields { connected: false, ..px4(0.5) }), Rejected::Disconnected);
        assert!(matches!(refused(Px4Fields { voltage_v: f32::NAN, ..px4(0.5) }), Rejected::NotFinite { .. }));
        assert!(matches!(refused(Px4Fields { voltage_v: -3.0, ..px4(0.5) }), Rejected::Negative { .. }));
        let absurd = Px4Fields { full_charge_capacity_wh: 1e6, ..px4(0.5) };
        assert!(matches!(refused(absurd), Rejected::Absurd { field: "full_charge_capacity_wh", .. }));
        assert!(matches!(refused(Px4Fields { current_a: 1e5, ..px4(0.5) }), Rejected::Absurd { field: "power_w", .. }));
    }

    #[test]
    fn px4_topics_take_the_vehicle_namespace() {
        assert_eq!(px4_topic("", "/fmu/out/battery_status").unwrap(), "/fmu/out/battery_status");
        assert_eq!(px4_topic("px4_1", "/fmu/out/battery_status").unwrap(), "/px4_1/fmu/out/battery_status");
        assert_eq!(px4_topic("/px4_2/", "fmu/out/battery_status").unwrap(), "/px4_2/fmu/out/battery_status");
        assert!(px4_topic("px4 1", "/fmu/out/battery_status").is_err());
        assert!(px4_topic("", "/fmu//battery_status").is_err());
        assert!(px4_topic("", "").is_err());
    }
}
