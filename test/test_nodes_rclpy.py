"""The four nodes seen by an independent ROS 2 program (rclpy): topics, decoded messages,
parameter errors and clean shutdown."""
import signal

import pytest
from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

NODES = ["battery_monitor", "shard_executor", "scheduler", "watchdog"]
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)


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

    expected = {"/aerokv/scheduler", "/aerokv/watchdog"}
    expected |= {f"/{uav}/{node}" for uav in ["uav1", "uav2", "uav3", "uav4"] for node in ["battery_monitor", "shard_executor"]}

    def all_seen():
        # Graph discovery of each node can trail its first messages: wait for every name.
        full = {f"{ns.rstrip('/')}/{n}" for n, ns in rclpy_node.get_node_names_and_namespaces()}
        return len(got) == 4 and expected <= full

    assert spin_until(rclpy_node, all_seen, timeout=20), (got.keys(), rclpy_node.get_node_names_and_namespaces(), launch.output())
    topics = dict(rclpy_node.get_topic_names_and_types())
    assert topics["/uav1/heartbeat"] == ["aerokv/msg/Heartbeat"]
    assert topics["/aerokv/assignment"] == ["aerokv/msg/Assignment"]

    assert got["heartbeat"].uav_id == "uav2" and got["heartbeat"].sequence > 0
    b = got["battery"]
    # uav3 starts at 60 % in swarm.launch.xml.
    # (state_of_charge is a float32: 0.6 is 0.6000000238 in the first report, before any discharge)
    assert b.uav_id == "uav3" and b.source == "simulation" and 0.55 < b.state_of_charge <= 0.6 + 1e-7
    assert b.energy_j == pytest.approx(b.capacity_j * b.state_of_charge, rel=1e-3)
    a = got["assignment"]
    assert a.epoch >= 1 and a.num_layers == 30 and sorted(a.ring) == ["uav1", "uav2", "uav3", "uav4"]
    assert got["diagnostics"].status[0].name.startswith("aerokv/")

    assert launch.stop(signal.SIGINT) == 0, launch.output()
    out = launch.output()
    assert out.count("stopped: exit code 0") == 10, out


def test_watchdog_declares_a_silent_uav_and_an_empty_battery_once(rclpy_node, procs):
    """rclpy plays two UAVs for the watchdog alone: uav7 beats, then falls silent; uav8 keeps
    reporting an empty battery. Each is declared failed once, with its reason."""
    import time

    from aerokv.msg import BatteryHealth, FailureEvent, Heartbeat
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    watchdog = procs([BIN / "watchdog", "--ros-args", "-r", "__ns:=/aerokv", "--params-file", ROOT / "config/swarm.yaml"], "watchdog")
    events = []
    rclpy_node.create_subscription(FailureEvent, "/aerokv/failures", events.append, EVENTS)
    states = {}  # the watchdog's latest /diagnostics status per name
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: states.update({s.name: s for s in m.status}), 10)
    beat = rclpy_node.create_publisher(Heartbeat, "/uav7/heartbeat", qos_profile_sensor_data)
    battery = rclpy_node.create_publisher(BatteryHealth, "/uav8/battery", qos_profile_sensor_data)
    sequence = 0

    def beating(until):
        nonlocal sequence
        sequence += 1
        beat.publish(Heartbeat(uav_id="uav7", sequence=sequence, state="ready"))
        return until()

    assert spin_until(rclpy_node, lambda: beating(lambda: "watching uav=uav7" in watchdog.output()), 20), watchdog.output()
    heard_until = time.time() + 0.5
    spin_until(rclpy_node, lambda: beating(lambda: time.time() > heard_until), 2)
    assert not [e for e in events if e.uav_id == "uav7"], "declared while it was beating"
    assert spin_until(rclpy_node, lambda: beating(lambda: "aerokv/uav7/heartbeat" in states), 3), states
    assert states["aerokv/uav7/heartbeat"].level == DiagnosticStatus.OK, states
    # a heartbeat on uav7's topic that claims to be another UAV is not believed
    beat.publish(Heartbeat(uav_id="uav9", sequence=1, state="ready"))
    # now silent: declared once phi passes its threshold, never before min_declare_s (0.15 s)
    assert spin_until(rclpy_node, lambda: any(e.uav_id == "uav7" for e in events), 5), watchdog.output()
    silent = [e for e in events if e.uav_id == "uav7"]
    assert [e.reason for e in silent] == ["heartbeat_timeout"] and silent[0].silence_s >= 0.15, silent
    assert "UAV declared failed uav=uav7" in watchdog.output() and "evidence=Phi" in watchdog.output()
    assert spin_until(rclpy_node, lambda: states["aerokv/uav7/heartbeat"].level == DiagnosticStatus.ERROR, 3), states
    assert "telemetry refused: it names \"uav9\" but came on \"uav7\"" in watchdog.output()
    assert "aerokv/uav9/heartbeat" not in states

    def empty():
        battery.publish(BatteryHealth(uav_id="uav8", energy_j=0.0, capacity_j=2.7e6, source="simulation"))
        return any(e.uav_id == "uav8" for e in events)

    assert spin_until(rclpy_node, empty, 20), watchdog.output()
    more = time.time() + 0.5
    spin_until(rclpy_node, lambda: empty() and time.time() > more, 2)
    assert [e.reason for e in events if e.uav_id == "uav8"] == ["battery_empty"], events
    assert [e.reason for e in events if e.uav_id == "uav7"] == ["heartbeat_timeout"], events


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
        ("/**/watchdog:\n  ros__parameters:\n    declare_phi: soon\n", "declare_phi"),
        ("/**/watchdog:\n  ros__parameters:\n    declare_phy: 8.0\n", "declare_phy"),
        # a value its type allows but the detector cannot work with
        ("/**/watchdog:\n  ros__parameters:\n    suspect_phi: 9.0\n    declare_phi: 8.0\n", "declare_phi"),
        ("/**/watchdog:\n  ros__parameters:\n    heartbeat_timeout_s: 0.15\n", "heartbeat_timeout_s"),
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
