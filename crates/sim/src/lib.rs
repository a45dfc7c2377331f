//! AeroKV mission simulator (pure Rust, no ROS). See DESIGN.md §7.
