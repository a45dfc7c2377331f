//! The four nodes. Each module has its typed parameters (`config/*.yaml`) and an async `run`.
pub mod battery_monitor;
pub mod discovery;
pub mod generate_api;
pub mod param_docs;
pub mod scheduler;
pub mod shard_executor;
pub mod watchdog;
