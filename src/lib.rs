//! AeroKV: resilient, lifespan-aware LLM inference across a UAV swarm.
//!
//! Layout of the workspace (the architecture, folder by folder):
//! - `crates/plan`   (`aerokv-plan`): swarm types, cost model, P1 protection planner, lifespan-aware
//!   layout, recovery planning, P2 reconfiguration. Pure Rust, no ROS.
//! - `crates/sim`    (`aerokv-sim`): the mission simulator over the planning core. Pure Rust.
//! - `crates/engine` (`aerokv-engine`): ONNX Runtime layer shards, per-layer KV caches, tokenizer,
//!   sampling. Pure Rust, no ROS.
//! - this crate (`aerokv`): the CLI (`cli`) and, with the `ros` feature, the ROS 2 nodes
//!   (`src/bin/*`), thin adapters from messages to the pure crates.
pub mod audit;
pub mod bag;
pub mod battery;
pub mod cli;
pub mod clock;
pub mod control;
pub mod dataplane;
pub mod decision;
pub mod detector;
pub mod diagnostics;
pub mod epoch;
pub mod fallback;
pub mod launch;
pub mod linkrate;
pub mod mission;
pub mod node_params;
pub mod os;
pub mod params;
pub mod radio;
pub mod requests;
#[cfg(feature = "ros")]
pub mod ros;
pub mod supervisor;
