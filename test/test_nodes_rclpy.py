"""The four nodes seen by an independent ROS 2 program (rclpy): topics, decoded messages,
parameter errors and clean shutdown."""
import signal

import pytest
from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

NODES = ["battery_monitor", "shard_executor", "scheduler", "watchdog"]
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)


def test_rclpy_sees_all_four_nodes_and_decodes_their_messages(rclpy_node, procs):
    from aerokv.msg import Assignment, BatteryHealth, Heartbeat
    from diagnostic_msgs.msg import DiagnosticArray

    launch = procs([BIN / "aerokv", "launch", ROOT / "launch/swarm.launch.xml"], "launch")
    got = {}

    def keep(key):
        return lambda m: got.setdefault(key, m)

    rclpy_node.create_subscription(Heartbeat, "/uav2/heartbeat", keep("heartbeat"), qos_profile_sensor_data)
    rclpy_node.create_subscription(BatteryHealth, "/uav3/battery", keep("battery"), qos_profile_sensor_data)
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", keep("assignment"), LATCHED)
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics", keep("diagnostics"), 10)

    def all_seen():
        names = {n for n, ns in rclpy_node.get_node_names_and_namespaces()}
        return len(got) == 4 and set(NODES) <= names

    assert spin_until(rclpy_node, all_seen, timeout=20), (got.keys(), rclpy_node.get_node_names_and_namespaces(), launch.output())
    full = {f"{ns.rstrip('/')}/{n}" for n, ns in rclpy_node.get_node_names_and_namespaces()}
    for uav in ["uav1", "uav2", "uav3", "uav4"]:
        assert {f"/{uav}/battery_monitor", f"/{uav}/shard_executor"} <= full
    assert {"/aerokv/scheduler", "/aerokv/watchdog"} <= full
    topics = dict(rclpy_node.get_topic_names_and_types())
    assert topics["/uav1/heartbeat"] == ["aerokv/msg/Heartbeat"]
    assert topics["/aerokv/assignment"] == ["aerokv/msg/Assignment"]

    assert got["heartbeat"].uav_id == "uav2" and got["heartbeat"].sequence > 0
    b = got["battery"]
    # uav3 starts at 60 % in swarm.launch.xml.
    assert b.uav_id == "uav3" and b.source == "simulation" and 0.55 < b.state_of_charge <= 0.6
    assert b.energy_j == pytest.approx(b.capacity_j * b.state_of_charge, rel=1e-3)
    a = got["assignment"]
    assert a.epoch >= 1 and a.num_layers == 30 and sorted(a.ring) == ["uav1", "uav2", "uav3", "uav4"]
    assert got["diagnostics"].status[0].name.startswith("aerokv/")

    assert launch.stop(signal.SIGINT) == 0, launch.output()
    out = launch.output()
    assert out.count("exit code Some(0)") == 10, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("node", NODES)
def test_node_exits_cleanly_on_signal(ros_domain, procs, node, sig):
    import time

    params = ROOT / ("config/uav.yaml" if node in ("battery_monitor", "shard_executor") else "config/swarm.yaml")
    p = procs([BIN / node, "--ros-args", "-r", "__ns:=/uav1", "--params-file", params], node)
    deadline = time.time() + 10
    while "started" not in p.output() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.stop(sig) == 0, p.output()
    assert "panicked" not in p.output()


@pytest.mark.parametrize(
    "yaml, field",
    [
        ("/**/watchdog:\n  ros__parameters:\n    heartbeat_timeout_s: soon\n", "heartbeat_timeout_s"),
        ("/**/watchdog:\n  ros__parameters:\n    heartbeat_timeut_s: 1.0\n", "heartbeat_timeut_s"),
    ],
)
def test_bad_parameter_file_names_file_and_field(ros_domain, procs, tmp_path, yaml, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml)
    p = procs([BIN / "watchdog", "--ros-args", "--params-file", bad], "watchdog")
    code = p.p.wait(timeout=10)
    out = p.output()
    assert code == 2, out
    assert str(bad) in out and field in out, out


def test_broken_yaml_is_refused(ros_domain, procs, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("/**/scheduler:\n  ros__parameters:\n    expected_uavs: [4,\n")
    p = procs([BIN / "scheduler", "--ros-args", "--params-file", bad], "scheduler")
    assert p.p.wait(timeout=10) == 2
    assert str(bad) in p.output() and "YAML" in p.output()
