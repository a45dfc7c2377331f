//! AeroKV shard engine (pure Rust, no ROS). See DESIGN.md §6 and docs/model-format.md.
