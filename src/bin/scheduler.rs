//! The `scheduler` node: see `aerokv::ros::nodes::scheduler`.
fn main() -> std::process::ExitCode {
    aerokv::ros::runtime::run_node("scheduler", aerokv::ros::nodes::scheduler::run)
}
