//! The `battery_monitor` node: see `aerokv::ros::nodes::battery_monitor`.
fn main() -> std::process::ExitCode {
    aerokv::ros::runtime::run_node("battery_monitor", aerokv::ros::nodes::battery_monitor::run)
}
