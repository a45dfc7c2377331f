//! The `watchdog` node: see `aerokv::ros::nodes::watchdog`.
fn main() -> std::process::ExitCode {
    aerokv::ros::runtime::run_node("watchdog", aerokv::ros::nodes::watchdog::run)
}
