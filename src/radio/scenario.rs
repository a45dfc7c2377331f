//! A radio scenario (`config/radio/*.yaml`): the emulated 802.11 ad-hoc network a swarm runs on.
//! Where every host (the control station and each UAV) is, or flies, over time; the 802.11
//! standard, rate control, transmit power, propagation loss and an optional frame error rate.
//! Loaded and validated here (pure, no ROS, no ns-3); [`Scenario::emulator_input`] writes the
//! plain input of the ns-3 program (`radio/aerokv_radio.cc`).
//!
//! Times are seconds on the mission clock, which starts when the request is sent; before that
//! every host stands at its first position.
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: serde_path_to_error::Error<serde_yaml::Error> },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// 802.11 standard of every radio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Standard {
    #[serde(rename = "802.11a")]
    A,
    #[serde(rename = "802.11b")]
    B,
    #[serde(rename = "802.11g")]
    G,
    #[serde(rename = "802.11n-2.4ghz")]
    N24,
    #[serde(rename = "802.11n-5ghz")]
    N5,
}

impl Standard {
    fn emulator_name(self) -> &'static str {
        match self {
            Standard::A => "80211a",
            Standard::B => "80211b",
            Standard::G => "80211g",
            Standard::N24 => "80211n_2_4ghz",
            Standard::N5 => "80211n_5ghz",
        }
    }

    /// Carrier frequency, Hz (the default channel ns-3 picks).
    fn frequency_hz(self) -> f64 {
        match self {
            Standard::A | Standard::N5 => 5.18e9,
            Standard::B | Standard::G | Standard::N24 => 2.412e9,
        }
    }

    /// The fixed rates a `constant` rate control may use (ns-3 WifiMode names).
    fn data_modes(self) -> &'static [&'static str] {
        const OFDM: &[&str] = &[
            "OfdmRate6Mbps",
            "OfdmRate9Mbps",
            "OfdmRate12Mbps",
            "OfdmRate18Mbps",
            "OfdmRate24Mbps",
            "OfdmRate36Mbps",
            "OfdmRate48Mbps",
            "OfdmRate54Mbps",
        ];
        const ERP: &[&str] = &[
            "ErpOfdmRate6Mbps",
            "ErpOfdmRate9Mbps",
            "ErpOfdmRate12Mbps",
            "ErpOfdmRate18Mbps",
            "ErpOfdmRate24Mbps",
            "ErpOfdmRate36Mbps",
            "ErpOfdmRate48Mbps",
            "ErpOfdmRate54Mbps",
        ];
        const DSSS: &[&str] = &["DsssRate1Mbps", "DsssRate2Mbps", "DsssRate5_5Mbps", "DsssRate11Mbps"];
        const HT: &[&str] = &["HtMcs0", "HtMcs1", "HtMcs2", "HtMcs3", "HtMcs4", "HtMcs5", "HtMcs6", "HtMcs7"];
        match self {
            Standard::A => OFDM,
            Standard::B => DSSS,
            Standard::G => ERP,
            Standard::N24 | Standard::N5 => HT,
        }
    }

    fn is_ht(self) -> bool {
        matches!(self, Standard::N24 | Standard::N5)
    }
}

/// How each radio picks its transmit rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateControl {
    /// Minstrel (802.11a/b/g): samples rates, follows the measured delivery ratio.
    Minstrel,
    /// Minstrel for 802.11n.
    MinstrelHt,
    /// Knows the receiver's SNR (an upper bound on what rate control can do).
    Ideal,
    /// Adaptive auto rate fallback.
    Aarf,
    /// One fixed rate: `data_mode`.
    Constant,
}

impl RateControl {
    fn emulator_name(self) -> &'static str {
        match self {
            RateControl::Minstrel => "ns3::MinstrelWifiManager",
            RateControl::MinstrelHt => "ns3::MinstrelHtWifiManager",
            RateControl::Ideal => "ns3::IdealWifiManager",
            RateControl::Aarf => "ns3::AarfWifiManager",
            RateControl::Constant => "ns3::ConstantRateWifiManager",
        }
    }
}

/// Path loss between two radios.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Propagation {
    /// L(d) = L(1 m) + 10 n log10(d / 1 m).
    LogDistance {
        exponent: f64,
        /// Loss at 1 m; default: free space at the standard's frequency (46.7 dB at 5.18 GHz).
        reference_loss_db: Option<f64>,
    },
    /// Free space.
    Friis,
}

/// One point of a host's flight: at mission time `t` it is at `position`; in between it moves
/// in a straight line at constant speed, after the last point it stays.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waypoint {
    pub t: f64,
    pub position: [f64; 3],
}

/// One host: a fixed `position` or `waypoints` (metres, x y z).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub position: Option<[f64; 3]>,
    pub waypoints: Option<Vec<Waypoint>>,
}

impl Host {
    /// The host's flight as waypoints (a fixed position is one waypoint at t = 0).
    pub fn track(&self) -> Vec<Waypoint> {
        match (&self.position, &self.waypoints) {
            (Some(p), _) => vec![Waypoint { t: 0.0, position: *p }],
            (None, Some(w)) => w.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// Where the host is at mission time `t` (linear between waypoints).
    pub fn position_at(&self, t: f64) -> [f64; 3] {
        let w = self.track();
        let Some(first) = w.first() else { return [0.0; 3] };
        if t <= first.t {
            return first.position;
        }
        for pair in w.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if t <= b.t {
                let f = (t - a.t) / (b.t - a.t);
                return std::array::from_fn(|i| a.position[i] + f * (b.position[i] - a.position[i]));
            }
        }
        w.last().map_or([0.0; 3], |l| l.position)
    }
}

/// The name of the control station's host; UAV hosts are named like their UAVs (`uav1`, ...).
pub const CONTROL_HOST: &str = "control";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows (free text).
    #[serde(default)]
    pub about: String,
    pub standard: Standard,
    pub rate_control: RateControl,
    /// The fixed rate of `rate_control: constant`, e.g. OfdmRate24Mbps.
    #[serde(default)]
    pub data_mode: Option<String>,
    pub tx_power_dbm: f64,
    pub propagation: Propagation,
    /// Beyond this distance nothing is received, whatever the path loss says.
    #[serde(default)]
    pub max_range_m: Option<f64>,
    /// Each received frame is lost with this probability (interference); unicast frames are
    /// retried by the MAC, broadcasts (DDS discovery) are not.
    #[serde(default)]
    pub frame_error_rate: f64,
    /// Frames each radio may queue (ns-3's default 500).
    #[serde(default = "default_queue")]
    pub queue_packets: u32,
    pub hosts: BTreeMap<String, Host>,
}

fn default_queue() -> u32 {
    500
}

/// One host of the emulated network as the emulator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EmulatedHost {
    pub name: String,
    pub tap: String,
    /// The MAC its radio gets in ns-3 (and its eth0 must carry).
    pub mac: String,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.into(), source })?;
        Scenario::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let s: Scenario = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|source| ScenarioError::Format { path: path.into(), source })?;
        s.validate().map_err(|what| ScenarioError::Invalid { path: path.into(), what })?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        let modes = self.standard.data_modes();
        match (self.rate_control, &self.data_mode) {
            (RateControl::Constant, None) => return Err("rate_control: constant needs data_mode".into()),
            (RateControl::Constant, Some(m)) if !modes.contains(&m.as_str()) => {
                return Err(format!("data_mode {m} is not a rate of this standard; one of: {}", modes.join(", ")))
            }
            (RateControl::Constant, Some(_)) => {}
            (_, Some(_)) => return Err("data_mode is only for rate_control: constant".into()),
            (_, None) => {}
        }
        match (self.rate_control, self.standard.is_ht()) {
            (RateControl::MinstrelHt, false) => {
                return Err("rate_control minstrel_ht is for 802.11n; use minstrel".into())
            }
            (RateControl::Minstrel | RateControl::Aarf, true) => {
                return Err("802.11n needs rate_control minstrel_ht, ideal or constant".into())
            }
            _ => {}
        }
        if !(-20.0..=40.0).contains(&self.tx_power_dbm) {
            return Err(format!("tx_power_dbm {} is outside -20..=40", self.tx_power_dbm));
        }
        if let Propagation::LogDistance { exponent, reference_loss_db } = self.propagation {
            if !(exponent > 0.0 && exponent <= 10.0) {
                return Err(format!("propagation.exponent {exponent} is outside (0, 10]"));
            }
            if let Some(l) = reference_loss_db.filter(|l| !(l.is_finite() && *l >= 0.0)) {
                return Err(format!("propagation.reference_loss_db {l} must be >= 0"));
            }
        }
        if let Some(r) = self.max_range_m.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return Err(format!("max_range_m {r} must be positive"));
        }
        if !(0.0..1.0).contains(&self.frame_error_rate) {
            return Err(format!("frame_error_rate {} is outside [0, 1)", self.frame_error_rate));
        }
        if self.queue_packets == 0 {
            return Err("queue_packets must be at least 1".into());
        }
        if !self.hosts.contains_key(CONTROL_HOST) {
            return Err(format!("hosts: `{CONTROL_HOST}` (the control station) is missing"));
        }
        for (name, host) in &self.hosts {
            if name != CONTROL_HOST && uav_number(name).is_none() {
                return Err(format!("hosts: `{name}` is neither `{CONTROL_HOST}` nor a UAV (uav1, uav2, ...)"));
            }
            let track = match (&host.position, &host.waypoints) {
                (Some(_), Some(_)) => return Err(format!("hosts.{name}: give position or waypoints, not both")),
                (None, None) => return Err(format!("hosts.{name}: needs a position or waypoints")),
                (None, Some(w)) if w.is_empty() => return Err(format!("hosts.{name}.waypoints is empty")),
                _ => host.track(),
            };
            let mut last = None;
            for (i, w) in track.iter().enumerate() {
                if !w.position.iter().all(|c| c.is_finite()) {
                    return Err(format!("hosts.{name}: position {i} is not a finite point"));
                }
                if !(w.t.is_finite() && w.t >= 0.0) || last.is_some_and(|l| w.t <= l) {
                    return Err(format!(
                        "hosts.{name}.waypoints[{i}]: t {} must be >= 0 and after the one before",
                        w.t
                    ));
                }
                last = Some(w.t);
            }
        }
        Ok(())
    }

    /// The hosts a swarm of `uavs` UAVs runs on: the control station, then uav1..uavN.
    pub fn swarm_hosts(&self, uavs: usize) -> Result<Vec<String>, String> {
        let names: Vec<String> =
            std::iter::once(CONTROL_HOST.to_string()).chain((1..=uavs).map(|i| format!("uav{i}"))).collect();
        let missing: Vec<&str> = names.iter().filter(|n| !self.hosts.contains_key(*n)).map(String::as_str).collect();
        if !missing.is_empty() {
            let have: Vec<&str> = self.hosts.keys().map(String::as_str).collect();
            return Err(format!("the scenario has no host {} (it has {})", missing.join(", "), have.join(", ")));
        }
        Ok(names)
    }

    /// When the mission's last movement ends (0 for a static scenario).
    pub fn last_movement_s(&self) -> f64 {
        self.hosts.values().flat_map(|h| h.track().last().map(|w| w.t)).fold(0.0, f64::max)
    }

    /// The emulator's input for `hosts` (in ns-3 node order).
    pub fn emulator_input(&self, hosts: &[EmulatedHost]) -> String {
        let mut o = String::from("# written by aerokv from a radio scenario\n");
        let _ = writeln!(o, "standard {}", self.standard.emulator_name());
        let _ = writeln!(o, "manager {}", self.rate_control.emulator_name());
        let _ = writeln!(o, "data_mode {}", self.data_mode.as_deref().unwrap_or("-"));
        let _ = writeln!(o, "tx_power_dbm {}", self.tx_power_dbm);
        match self.propagation {
            Propagation::LogDistance { exponent, reference_loss_db } => {
                let l = reference_loss_db.unwrap_or_else(|| free_space_loss_db(self.standard.frequency_hz(), 1.0));
                let _ = writeln!(o, "propagation log_distance {exponent} {l}");
            }
            Propagation::Friis => o.push_str("propagation friis\n"),
        }
        let _ = writeln!(o, "max_range_m {}", self.max_range_m.unwrap_or(0.0));
        let _ = writeln!(o, "frame_error_rate {}", self.frame_error_rate);
        let _ = writeln!(o, "queue_packets {}", self.queue_packets);
        let _ = writeln!(o, "report_period_s 1");
        for (i, h) in hosts.iter().enumerate() {
            let _ = writeln!(o, "node {i} {} {} {}", h.name, h.tap, h.mac);
            for w in self.hosts.get(&h.name).map(Host::track).unwrap_or_default() {
                let [x, y, z] = w.position;
                let _ = writeln!(o, "waypoint {i} {} {x} {y} {z}", w.t);
            }
        }
        o
    }
}

/// `uav7` -> 7.
pub fn uav_number(name: &str) -> Option<u32> {
    name.strip_prefix("uav").filter(|n| !n.starts_with('0')).and_then(|n| n.parse().ok()).filter(|&n| n >= 1)
}

/// Free-space path loss at distance `d` metres, dB (Friis).
pub fn free_space_loss_db(frequency_hz: f64, d: f64) -> f64 {
    20.0 * (4.0 * std::f64::consts::PI * d * frequency_hz / 299_792_458.0).log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "standard: 802.11a\nrate_control: minstrel\ntx_power_dbm: 16\n\
        propagation: {model: log_distance, exponent: 3}\nhosts:\n  control: {position: [0, 0, 0]}\n";

    fn parse(extra: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(&format!("{BASE}{extra}"), Path::new("test.yaml"))
    }

    fn err(extra: &str) -> String {
        format!("{}", parse(extra).unwrap_err())
    }

    #[test]
    fn every_scenario_of_the_package_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/radio");
        let mut n = 0;
        for name in ["near", "mid", "lossy", "moving", "partition"] {
            let s = Scenario::load(&dir.join(format!("{name}.yaml"))).unwrap_or_else(|e| panic!("{e}"));
            s.swarm_hosts(3).unwrap();
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn a_host_flies_between_waypoints() {
        let s = parse("  uav1:\n    waypoints:\n      - {t: 0, position: [10, 0, 0]}\n      - {t: 2, position: [30, 0, 0]}\n      - {t: 5, position: [30, 0, 0]}\n").unwrap();
        let h = &s.hosts["uav1"];
        assert_eq!(h.position_at(0.0), [10.0, 0.0, 0.0]);
        assert_eq!(h.position_at(1.0), [20.0, 0.0, 0.0]);
        assert_eq!(h.position_at(9.0), [30.0, 0.0, 0.0]);
        assert_eq!(s.last_movement_s(), 5.0);
        assert_eq!(s.hosts["control"].position_at(3.0), [0.0; 3]);
    }

    #[test]
    fn the_emulator_input_lists_nodes_in_order_with_their_tracks() {
        let s = parse("  uav1: {position: [10, 0, 0]}\nframe_error_rate: 0.05\n").unwrap();
        let hosts: Vec<EmulatedHost> = ["control", "uav1"]
            .iter()
            .enumerate()
            .map(|(i, n)| EmulatedHost { name: n.to_string(), tap: format!("tap{i}"), mac: format!("m{i}") })
            .collect();
        let input = s.emulator_input(&hosts);
        assert!(input.contains("standard 80211a\nmanager ns3::MinstrelWifiManager\n"), "{input}");
        assert!(input.contains("frame_error_rate 0.05\n"), "{input}");
        assert!(
            input.contains("node 0 control tap0 m0\nwaypoint 0 0 0 0 0\nnode 1 uav1 tap1 m1\nwaypoint 1 0 10 0 0\n")
        );
        // Free space at 1 m and 5.18 GHz.
        let l: f64 =
            input.lines().find_map(|l| l.strip_prefix("propagation log_distance 3 ")).unwrap().parse().unwrap();
        assert!((l - 46.7).abs() < 0.1, "{l}");
    }

    #[test]
    fn missing_hosts_are_named() {
        let s = parse("  uav1: {position: [10, 0, 0]}\n").unwrap();
        assert_eq!(s.swarm_hosts(1).unwrap(), vec!["control", "uav1"]);
        let e = s.swarm_hosts(3).unwrap_err();
        assert!(e.contains("no host uav2, uav3") && e.contains("it has control, uav1"), "{e}");
    }

    #[test]
    fn bad_scenarios_say_what_is_wrong() {
        for (extra, why) in [
            ("  uav1: {}\n", "hosts.uav1: needs a position or waypoints"),
            ("  uav1: {position: [1, 2, 3], waypoints: [{t: 0, position: [0, 0, 0]}]}\n", "not both"),
            ("  uav1: {waypoints: []}\n", "waypoints is empty"),
            (
                "  uav1: {waypoints: [{t: 1, position: [0, 0, 0]}, {t: 1, position: [5, 0, 0]}]}\n",
                "after the one before",
            ),
            ("  uav1: {waypoints: [{t: -1, position: [0, 0, 0]}]}\n", "must be >= 0"),
            ("  uav1: {position: [.nan, 0, 0]}\n", "not a finite point"),
            ("  drone1: {position: [1, 0, 0]}\n", "neither `control` nor a UAV"),
            ("  uav01: {position: [1, 0, 0]}\n", "neither `control` nor a UAV"),
            ("  uav1: {position: [1, 0]}\n", "hosts.uav1.position"),
            ("  uav1: {position: [1, 0, 0], speed: 3}\n", "unknown field `speed`"),
            ("frame_error_rate: 1.0\n", "frame_error_rate 1 is outside [0, 1)"),
            ("max_range_m: 0\n", "max_range_m 0 must be positive"),
            ("queue_packets: 0\n", "queue_packets must be at least 1"),
            ("data_mode: OfdmRate24Mbps\n", "only for rate_control: constant"),
            ("colour: red\n", "unknown field `colour`"),
        ] {
            let e = err(extra);
            assert!(e.contains(why), "{extra:?}: {e}");
            assert!(e.starts_with("test.yaml"), "{e}");
        }
        let swap = |from: &str, to: &str| {
            let text = BASE.replace(from, to);
            format!("{}", Scenario::parse(&text, Path::new("t.yaml")).unwrap_err())
        };
        assert!(swap("802.11a", "802.11x").contains("standard"));
        assert!(swap("rate_control: minstrel", "rate_control: constant").contains("needs data_mode"));
        assert!(swap("rate_control: minstrel", "rate_control: minstrel_ht").contains("for 802.11n"));
        assert!(swap("802.11a", "802.11n-5ghz").contains("needs rate_control minstrel_ht"));
        assert!(swap("tx_power_dbm: 16", "tx_power_dbm: 60").contains("outside -20..=40"));
        assert!(swap("exponent: 3", "exponent: 0").contains("exponent 0 is outside"));
        assert!(swap("model: log_distance, exponent: 3", "model: two_ray").contains("unknown variant `two_ray`"));
        assert!(swap("  control: {position: [0, 0, 0]}\n", "  uav1: {position: [0, 0, 0]}\n").contains("`control`"));
        let constant = BASE.replace("rate_control: minstrel", "rate_control: constant\ndata_mode: DsssRate11Mbps");
        let e = format!("{}", Scenario::parse(&constant, Path::new("t.yaml")).unwrap_err());
        assert!(e.contains("not a rate of this standard") && e.contains("OfdmRate54Mbps"), "{e}");
    }
}
