//! The `shard_executor` node: see `aerokv::ros::nodes::shard_executor`.
fn main() -> std::process::ExitCode {
    aerokv::ros::runtime::run_node("shard_executor", aerokv::ros::nodes::shard_executor::run)
}
