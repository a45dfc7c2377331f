//! Scenario files (YAML): swarm, model, request and failure process of one mission.
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use aerokv_plan::{ModelSpec, PlanConfig, PowerModel, SwarmState, UavState};

use crate::error::SimError;

/// A fixed value or a range sampled uniformly per UAV.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Fixed(f64),
    Range { min: f64, max: f64 },
}

impl Value {
    fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        match *self {
            Value::Fixed(v) => v,
            Value::Range { min, max } if max > min => rng.gen_range(min..max),
            Value::Range { min, .. } => min,
        }
    }
    pub fn max(&self) -> f64 {
        match *self {
            Value::Fixed(v) => v,
            Value::Range { max, .. } => max,
        }
    }
    fn check(&self, field: &'static str, positive: bool) -> Result<(), SimError> {
        let ok = |v: f64| v.is_finite() && if positive { v > 0.0 } else { v >= 0.0 };
        let good = match *self {
            Value::Fixed(v) => ok(v),
            Value::Range { min, max } => ok(min) && ok(max) && min <= max,
        };
        if good {
            Ok(())
        } else {
            Err(SimError::Scenario {
                field,
                reason: format!("{self:?} must be {} (and min <= max)", if positive { "> 0" } else { ">= 0" }),
            })
        }
    }
}

/// One mission scenario. Units are in the field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub uavs: u32,
    pub layers: u32,
    /// Total parameters of the model.
    pub params: f64,
    pub bytes_per_param: f64,
    pub kv_bytes_per_token_layer: f64,
    /// Tokens of the request.
    pub tokens: u64,
    pub memory_gib: Value,
    /// Initial energy per UAV.
    pub energy_kj: Value,
    /// Full battery; default: the largest initial energy.
    #[serde(default)]
    pub capacity_kj: Option<f64>,
    pub flight_power_w: Value,
    pub inference_power_w: f64,
    /// Power floor as a fraction of full inference power (reached at 20% charge).
    pub power_floor: f64,
    pub latency_alpha: f64,
    pub layer_latency_ms: Value,
    pub tx_power_w: f64,
    pub link_mbps: Value,
    pub deadline_s: f64,
    pub weight_load_gbps: f64,
    pub snapshot_periods: Vec<u32>,
    /// Expected number of failures over the mission (Poisson).
    pub expected_failures: f64,
    /// Energy each UAV whose assignment changes spends on a reconfiguration, J.
    pub reconfiguration_energy_j: f64,
    /// Snapshot period of the SO baseline.
    #[serde(default = "default_so_period")]
    pub so_period: u32,
    /// Lifetime beyond this many times the request counts as enough (layout and P1); `null`:
    /// pure max-min lifetime.
    #[serde(default = "default_lifetime_target")]
    pub lifetime_target_factor: Option<f64>,
}

fn default_so_period() -> u32 {
    32
}

fn default_lifetime_target() -> Option<f64> {
    Some(2.0)
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> Result<Self, SimError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| SimError::Io { path: path.display().to_string(), source: e })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, SimError> {
        let s: Scenario = serde_yaml::from_str(text).map_err(|e| SimError::Yaml(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Check every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |field: &'static str, reason: &str| Err(SimError::Scenario { field, reason: reason.to_string() });
        if self.uavs < 2 {
            return bad("uavs", "need at least 2 UAVs");
        }
        if self.layers < self.uavs {
            return bad("layers", "need at least one layer per UAV");
        }
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !pos(self.params) {
            return bad("params", "must be > 0");
        }
        if !pos(self.bytes_per_param) {
            return bad("bytes_per_param", "must be > 0");
        }
        if !nonneg(self.kv_bytes_per_token_layer) {
            return bad("kv_bytes_per_token_layer", "must be >= 0");
        }
        if self.tokens == 0 {
            return bad("tokens", "must be > 0");
        }
        self.memory_gib.check("memory_gib", true)?;
        self.energy_kj.check("energy_kj", true)?;
        if let Some(c) = self.capacity_kj {
            if !pos(c) || c < self.energy_kj.max() {
                return bad("capacity_kj", "must be > 0 and at least the largest initial energy");
            }
        }
        self.flight_power_w.check("flight_power_w", false)?;
        if !nonneg(self.inference_power_w) {
            return bad("inference_power_w", "must be >= 0");
        }
        if !(self.power_floor > 0.0 && self.power_floor <= 1.0) {
            return bad("power_floor", "must be in (0, 1]");
        }
        if !nonneg(self.latency_alpha) {
            return bad("latency_alpha", "must be >= 0");
        }
        self.layer_latency_ms.check("layer_latency_ms", true)?;
        if !nonneg(self.tx_power_w) {
            return bad("tx_power_w", "must be >= 0");
        }
        self.link_mbps.check("link_mbps", true)?;
        if !nonneg(self.deadline_s) {
            return bad("deadline_s", "must be >= 0");
        }
        if !pos(self.weight_load_gbps) {
            return bad("weight_load_gbps", "must be > 0");
        }
        if self.snapshot_periods.is_empty() || self.snapshot_periods.contains(&0) {
            return bad("snapshot_periods", "must be a non-empty list of periods >= 1");
        }
        if !nonneg(self.expected_failures) {
            return bad("expected_failures", "must be >= 0");
        }
        if !nonneg(self.reconfiguration_energy_j) {
            return bad("reconfiguration_energy_j", "must be >= 0");
        }
        if self.so_period == 0 {
            return bad("so_period", "must be >= 1");
        }
        Ok(())
    }

    pub fn model(&self) -> ModelSpec {
        ModelSpec {
            num_layers: self.layers,
            weight_bytes_per_layer: self.params * self.bytes_per_param / f64::from(self.layers),
            kv_bytes_per_token_layer: self.kv_bytes_per_token_layer,
            total_tokens: self.tokens,
            tokens_done: 0,
        }
    }

    pub fn config(&self) -> PlanConfig {
        PlanConfig {
            deadline_s: self.deadline_s,
            weight_load_bps: self.weight_load_gbps * 1e9,
            snapshot_periods: self.snapshot_periods.clone(),
            power: PowerModel { floor_fraction: self.power_floor, alpha: self.latency_alpha, ..PowerModel::default() },
            recoverable_memory: true,
            lifetime_target_factor: self.lifetime_target_factor,
            channel: None,
        }
    }

    /// The swarm of one seed (UAV ids 0..n, ring in id order).
    pub fn swarm(&self, rng: &mut ChaCha8Rng) -> SwarmState {
        let cap = self.capacity_kj.unwrap_or(self.energy_kj.max()) * 1e3;
        let uavs = (0..self.uavs)
            .map(|id| UavState {
                id,
                energy_j: self.energy_kj.sample(rng) * 1e3,
                capacity_j: cap,
                memory_bytes: self.memory_gib.sample(rng) * 1024f64.powi(3),
                link_bps: self.link_mbps.sample(rng) * 1e6,
                flight_power_w: self.flight_power_w.sample(rng),
                compute_power_w: self.inference_power_w,
                layer_latency_s: self.layer_latency_ms.sample(rng) * 1e-3,
                latency_measured: false,
                tx_power_w: self.tx_power_w,
            })
            .collect();
        SwarmState { uavs, config: self.config() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAPER: &str = include_str!("../../../config/scenarios/paper.yaml");

    #[test]
    fn paper_scenario_parses() {
        let s = Scenario::parse(PAPER).unwrap();
        assert_eq!(s.uavs, 16);
        assert_eq!(s.layers, 64);
        assert!((s.model().weight_bytes_per_layer - 1e9).abs() < 1.0);
    }

    #[test]
    fn errors_name_the_field() {
        let bad = PAPER.replace("deadline_s: 3", "deadline_s: -1");
        match Scenario::parse(&bad) {
            Err(SimError::Scenario { field, .. }) => assert_eq!(field, "deadline_s"),
            other => panic!("{other:?}"),
        }
        let bad = PAPER.replace("link_mbps: {min: 15, max: 30}", "link_mbps: {min: 30, max: 15}");
        match Scenario::parse(&bad) {
            Err(SimError::Scenario { field, .. }) => assert_eq!(field, "link_mbps"),
            other => panic!("{other:?}"),
        }
        let unknown = format!("{PAPER}\nbogus_field: 3\n");
        let e = Scenario::parse(&unknown).unwrap_err().to_string();
        assert!(e.contains("bogus_field"), "{e}");
    }
}
