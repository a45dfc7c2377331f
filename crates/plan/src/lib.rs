//! AeroKV planning core (pure Rust, no ROS). See DESIGN.md §3–§4.
