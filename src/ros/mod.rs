//! ROS 2 side of AeroKV (feature `ros`): the node runtime, topic names and QoS, message
//! conversions, and the four nodes. Each node is a thin adapter from messages to the pure crates.
pub mod auth;
pub mod bag;
pub mod clock;
pub mod convert;
pub mod diagnostics;
pub mod fallback;
pub mod names;
pub mod nodes;
pub mod params;
pub mod record;
pub mod replay;
pub mod rosout;
pub mod runtime;

pub use runtime::{
    hop_ms, now_stamp, percentiles, shutdown_phase, stamp_secs, unix_now, NodeContext, Publishers, ShutdownPhase,
    SpinThread, Spinner, SPIN_TIMEOUT,
};
