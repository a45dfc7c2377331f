//! AeroKV planning core (pure Rust, no ROS). See docs/design.md §3-§5.
//!
//! # What the live scheduler calls
//!
//! Build a [`SwarmState`] from live battery values and the per-layer latency the engine
//! MEASURED (set [`UavState::latency_measured`] when the latency was measured at the current
//! power, so the battery model does not scale it again), and a [`ModelSpec`] from the engine's
//! measured weight bytes and KV bytes per token per layer, the request length and the tokens
//! done. Then:
//!
//! ```text
//! plan_initial_layout(&SwarmState, &ModelSpec) -> Result<Layout>             // lifespan-aware layer counts
//! Layout::ring(&self) -> Ring                                                 // ring = layout order
//! plan_protection(&SwarmState, &ModelSpec, &Layout, &Ring) -> Result<ProtectionPlan>   // P1, exact
//! plan_protection_relaxed(..same..) -> Result<ProtectionPlan>                 // P1 when strict is infeasible
//! plan_recovery(&SwarmState, &ModelSpec, &Layout, &Ring, &ProtectionPlan, failed, RecoveryContext)
//!     -> Result<RecoveryPlan>                                                 // who takes what, replay, time, energy
//! held_state(&old Layout, &old ProtectionPlan, &post-recovery Layout) -> Vec<(UavId, LayerInterval)>
//! reconfigure(&SwarmState, &ModelSpec, &Layout, &Ring, held) -> Result<Reconfiguration> // P2
//! plan_failover(..., failed, RecoveryContext) -> Result<Failover>            // recovery + P2 + P1-new in one call
//! retirement_candidates(&SwarmState, &ModelSpec, &Layout, &Ring, &ProtectionPlan) -> Result<Vec<UavId>>
//! retirements_due(.., horizon_tokens) -> Result<Vec<UavId>>               // the candidates to retire now
//! evaluate(&SwarmState, &ModelSpec, &Layout, &Ring, &ProtectionPlan, kv_tokens) -> Result<SwarmCost> // cost model
//! ```
//!
//! For a retirement call [`plan_failover`] with `RecoveryContext { graceful: true, .. }`.
//! After a failover, bump the epoch and publish `Failover::reconfiguration.layout`,
//! `Failover::recovery.ring` and `Failover::protection`.
//!
//! Conventions: [`LayerInterval`] is half-open and taken modulo the layer count, so an interval
//! may wrap around the gateway (`[60, 66)` of 64 layers = layers 60..63, 0, 1): that is how the
//! first stage holds the last layers after the last stage fails. P2 ([`reconfigure`]) wraps a
//! stage only when the survivors' state leaves it no other layout, and P1 keeps such a stage's
//! head replica before the gateway ([`LayerInterval::max_head`]). A [`Layout`] lists its UAVs
//! in ring order and is validated on construction (exact cover, >= 1 layer each, contiguous in
//! ring order); errors name the UAV and interval. Nothing here panics on user input; every
//! failure is a [`PlanError`].
//!
//! Modelling choices (see the module docs): pipeline latency is the slowest stage (as in the
//! paper), a stage computes its native layers and the head replica of its successor, memory is
//! planned for `total_tokens` of KV, and P1 maximises the minimum expected remaining tokens.
pub mod cost;
pub mod error;
pub mod initial;
mod p1;
pub mod protection;
pub mod radio;
pub mod recovery;
pub mod types;

pub use cost::{evaluate, power_fraction, EnergyBreakdown, MemoryBreakdown, SwarmCost, UavCost};
pub use error::{PlanError, Result};
pub use initial::{plan_initial_layout, plan_initial_layout_with, uniform_layout, LayoutObjective};
pub use protection::{plan_fixed, plan_protection, plan_protection_beam, plan_protection_relaxed, FixedPolicy};
pub use radio::{predict_tokens_per_s, Channel, RadioPrediction, Traffic};
pub use recovery::{
    check_recovery_memory, held_state, plan_failover, plan_recovery, reconfigure, retirement_candidates,
    retirements_due, Failover, Reconfiguration, RecoveryContext, RecoveryPlan, TailSource,
};
pub use types::{
    LayerInterval, Layout, ModelSpec, PlanConfig, PowerModel, Protection, ProtectionPlan, Ring, SwarmState, UavId,
    UavState,
};

#[cfg(test)]
mod tests;
