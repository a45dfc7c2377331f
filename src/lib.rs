//! AeroKV: resilient, lifespan-aware LLM inference across a UAV swarm.
//!
//! Layout of the workspace (the architecture, folder by folder):
//! - `crates/plan`   (`aerokv-plan`): swarm types, cost model (with 802.11 airtime), P1 protection
//!   planner, lifespan-aware layout, recovery planning, P2 reconfiguration. Pure Rust, no ROS.
//! - `crates/sim`    (`aerokv-sim`): the mission simulator over the planning core, mission reports.
//! - `crates/engine` (`aerokv-engine`): ONNX Runtime layer shards, in-place KV caches, tokenizer,
//!   sampling, model integrity. No ROS.
//! - `crates/codec`  (`aerokv-codec`): activation and KV codecs. `crates/auth` (`aerokv-auth`):
//!   identities, keystore, Ed25519 signing with replay windows. No ROS.
//! - this crate (`aerokv`): the pure decisions of the nodes (`control`, `decision`, `epoch`,
//!   `requests`, `interleave`, `admission`, `standby`, `detector`, `fallback`, `linkrate`, `stations`, `dataplane`, `battery`, `audit`, `mission`, `replay`,
//!   `clock`, `node_params`, `diagnostics`), rosbag2 storage (`bag`), radio scenarios (`radio`),
//!   the CLI (`cli`) and, with the `ros` feature, the ROS 2 adapters (`ros`; nodes in
//!   `src/bin/*`): thin, messages in and out of the pure modules.
pub mod admission;
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
pub mod interleave;
pub mod launch;
pub mod linkrate;
pub mod mission;
pub mod node_params;
pub mod os;
pub mod params;
pub mod radio;
pub mod replay;
pub mod requests;
#[cfg(feature = "ros")]
pub mod ros;
pub mod standby;
pub mod stations;
pub mod supervisor;
