"""launch/gazebo.launch.xml and its ros_gz_bridge file (config/gazebo/bridge.yaml) agree: every
battery topic the bridge publishes is subscribed to, with the same type, by a battery monitor of
the launch, and every battery monitor of the launch gets its battery from the bridge.

The launch file is resolved by the project's launcher (`aerokv launch --print`: each node with the
namespace, parameter files and values `ros2 launch` gives it, config/uav.yaml included); each
battery monitor is then started with exactly those arguments and rclpy asks the ROS graph what it
subscribes to. Nothing is restated here: renaming a topic in either file fails this test."""
import copy
import json
import subprocess

import yaml
from conftest import BIN, ROOT, spin_until

LAUNCH = ROOT / "launch" / "gazebo.launch.xml"
BATTERY_STATE = "sensor_msgs/msg/BatteryState"


def launch_nodes():
    out = subprocess.run([BIN / "aerokv", "launch", LAUNCH, "--print"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def param(node, name):
    """The value the launch gives parameter `name` (`-p name:=value`), if any."""
    args = node["args"]
    values = [a.split(":=", 1)[1] for prev, a in zip(args, args[1:]) if prev == "-p" and a.startswith(name + ":=")]
    return values[-1] if values else None


def mismatches(entries, subscriptions):
    """What the bridge entries and the battery monitors' subscriptions ({fqn: [(topic, [types])]})
    disagree on, one sentence each."""
    problems = []
    bridged = {}
    for e in entries:
        if e.get("direction") != "GZ_TO_ROS":
            problems.append(f"{e['ros_topic_name']}: direction {e.get('direction')}, expected GZ_TO_ROS")
        bridged[e["ros_topic_name"]] = e["ros_type_name"]
    if bridged.pop("/clock", None) != "rosgraph_msgs/msg/Clock":
        problems.append("no /clock (rosgraph_msgs/msg/Clock) for use_sim_time")
    subscribed = {}
    for subs in subscriptions.values():
        for topic, types in subs:
            subscribed.setdefault(topic, set()).update(types)
    for topic, type_ in bridged.items():
        if type_ not in subscribed.get(topic, ()):
            problems.append(f"the bridge publishes {topic} ({type_}); no battery monitor subscribes to it with that type")
    for fqn, subs in subscriptions.items():
        batteries = [topic for topic, types in subs if BATTERY_STATE in types]
        if not batteries:
            problems.append(f"{fqn} subscribes to no {BATTERY_STATE}")
        for topic in batteries:
            if bridged.get(topic) != BATTERY_STATE:
                problems.append(f"{fqn} subscribes to {topic} ({BATTERY_STATE}), which the bridge does not publish")
    return problems


def test_bridge_topics_and_types_are_what_the_battery_monitors_subscribe_to(rclpy_node, procs):
    nodes = launch_nodes()
    bridges = [n for n in nodes if n["package"] == "ros_gz_bridge"]
    assert [b["executable"] for b in bridges] == ["parameter_bridge"], nodes
    assert param(bridges[0], "use_sim_time") == "true"
    config = param(bridges[0], "config_file")
    assert config == str(ROOT / "config/gazebo/bridge.yaml"), config
    entries = yaml.safe_load(open(config))
    monitors = [n for n in nodes if n["executable"] == "battery_monitor"]
    assert len(monitors) == 4 and all(param(m, "source") == "battery_state" for m in monitors), monitors

    # Gazebo's clock, as the bridge republishes it: with use_sim_time the monitors start on it.
    from rosgraph_msgs.msg import Clock

    clock_pub = rclpy_node.create_publisher(Clock, "/clock", 10)
    sim_ns = [0]

    def tick():
        sim_ns[0] += 10_000_000
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(sim_ns[0], 1_000_000_000)
        clock_pub.publish(msg)

    timer = rclpy_node.create_timer(0.01, tick)
    for m in monitors:
        procs([BIN / "battery_monitor", *m["args"]], m["fqn"].strip("/").replace("/", "_"))
    subscriptions = {}

    def all_subscribed():
        for m in monitors:
            ns, name = m["fqn"].rsplit("/", 1)
            try:
                subs = rclpy_node.get_subscriber_names_and_types_by_node(name, ns)
            except Exception:  # not discovered yet
                continue
            if any(BATTERY_STATE in types for _, types in subs):
                subscriptions[m["fqn"]] = subs
        return len(subscriptions) == len(monitors)

    try:
        assert spin_until(rclpy_node, all_subscribed, timeout=30), subscriptions
    finally:
        rclpy_node.destroy_timer(timer)
        rclpy_node.destroy_publisher(clock_pub)
    assert mismatches(entries, subscriptions) == []

    # The check finds each kind of disagreement.
    renamed = copy.deepcopy(entries)
    renamed[1]["ros_topic_name"] = "/uav1/battery"
    assert len(mismatches(renamed, subscriptions)) == 2, mismatches(renamed, subscriptions)
    retyped = copy.deepcopy(entries)
    retyped[2]["ros_type_name"] = "sensor_msgs/msg/Imu"
    assert mismatches(retyped, subscriptions), retyped
    assert mismatches(entries[:-1], subscriptions), "a UAV without a bridged battery"
    assert mismatches(entries[1:], subscriptions), "no /clock"
