//! The one error type of the planning core.
use crate::types::{LayerInterval, UavId};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the swarm has no UAV")]
    EmptySwarm,
    #[error("uav {uav} appears twice")]
    DuplicateUav { uav: UavId },
    #[error("uav {uav} is not in the swarm state")]
    UnknownUav { uav: UavId },
    #[error("uav {uav}: field {field} has invalid value {value}")]
    InvalidUav { uav: UavId, field: &'static str, value: f64 },
    #[error("invalid planning configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid model specification: {0}")]
    InvalidModel(String),
    #[error("uav {uav}: interval {interval} is empty (every UAV needs at least one layer)")]
    EmptyInterval { uav: UavId, interval: LayerInterval },
    #[error("uav {uav}: interval {interval} is out of range for {num_layers} layers")]
    IntervalOutOfRange { uav: UavId, interval: LayerInterval, num_layers: u32 },
    #[error("uav {uav}: interval {interval} ends where the next UAV in ring order does not start (it starts at {next_start})")]
    NotContiguous { uav: UavId, interval: LayerInterval, next_start: u32 },
    #[error("layout covers {covered} layers, the model has {num_layers}")]
    NotExactCover { covered: u64, num_layers: u32 },
    #[error("ring and layout disagree: {0}")]
    RingMismatch(String),
    #[error("{uavs} UAVs cannot hold {num_layers} layers with at least one layer each")]
    TooFewLayers { uavs: usize, num_layers: u32 },
    #[error("no layout fits memory: {0}")]
    LayoutInfeasible(String),
    #[error("uav {uav}: no protection meets the {deadline_s} s recovery deadline (a tail of {min_tail} layers still takes {best_s:.3} s)")]
    DeadlineUnreachable { uav: UavId, deadline_s: f64, min_tail: u32, best_s: f64 },
    #[error("no protection plan fits the memory budgets: {0}")]
    ProtectionMemory(String),
    #[error("a single UAV cannot protect itself")]
    SingleUav,
    #[error("uav {uav} is not in the ring")]
    NotInRing { uav: UavId },
    #[error("layers lost: {lost:?}: {reason}")]
    LayersLost { lost: Vec<LayerInterval>, reason: String },
    #[error("no state-constrained layout over the survivors: {0}")]
    NoReconfiguration(String),
    #[error("uav {uav} cannot take over: after the recovery it would hold {layers} layers needing {need_bytes:.0} bytes (weights and KV), its budget is {budget_bytes:.0}")]
    RecoveryMemory { uav: UavId, layers: u32, need_bytes: f64, budget_bytes: f64 },
}

pub type Result<T> = std::result::Result<T, PlanError>;
