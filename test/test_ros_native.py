"""AeroKV as ROS tools see it, on one swarm started with use_sim_time:=true: time from a /clock that
rclpy publishes (faster and slower than real time, then stopped), the parameter services, /rosout
and /diagnostics of every node. The answers are checked against `aerokv generate` (one process,
the real q4 model)."""
import json
import signal
import subprocess
import threading
import time

from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

PROMPT = "What is a drone?"
MAX_TOKENS = 16
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
ROSOUT = QoSProfile(depth=1000, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
NODES = ["/aerokv/scheduler", "/aerokv/watchdog", "/uav1/shard_executor", "/uav1/battery_monitor"]
# Simulated time starts far from the wall clock's: a stamp shows which clock made it.
SIM_START_S = 1000.0


class SimClock(threading.Thread):
    """Publishes /clock every 5 ms of real time, advancing `rate` simulated seconds per real one;
    `rate = 0` stops time (and its messages)."""

    def __init__(self, node):
        from rosgraph_msgs.msg import Clock

        super().__init__(daemon=True)
        self.Clock = Clock
        self.pub = node.create_publisher(Clock, "/clock", 10)
        self.rate = 1.0
        self.t = SIM_START_S
        self.done = threading.Event()

    def run(self):
        last = time.monotonic()
        while not self.done.wait(0.005):
            now = time.monotonic()
            self.t += (now - last) * self.rate
            last = now
            if self.rate > 0:
                msg = self.Clock()
                msg.clock.sec, msg.clock.nanosec = int(self.t), int((self.t % 1) * 1e9)
                self.pub.publish(msg)


def call(node, client, request, timeout=30):
    assert client.wait_for_service(timeout_sec=30), client.srv_name
    future = client.call_async(request)
    assert spin_until(node, future.done, timeout=timeout), request
    return future.result()


def test_a_sim_time_swarm_as_ros_tools_see_it(rclpy_node, procs, tmp_path):
    from aerokv.msg import Assignment, BatteryHealth, FailureEvent, Heartbeat
    from aerokv.srv import Generate
    from diagnostic_msgs.msg import DiagnosticArray
    from rcl_interfaces.msg import Log, Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import DescribeParameters, GetParameters, ListParameters, SetParameters, SetParametersAtomically
    from sensor_msgs.msg import BatteryState

    ref = subprocess.run([BIN / "aerokv", "generate", "--user", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    reference = json.loads(ref.stdout)

    logs, statuses, failures, beats, batteries, latest = [], {}, [], [], {}, {}
    rclpy_node.create_subscription(Log, "/rosout", logs.append, ROSOUT)
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: statuses.update({s.name: (m.header, s) for s in m.status}), 50)
    rclpy_node.create_subscription(FailureEvent, "/aerokv/failures", failures.append, EVENTS)
    rclpy_node.create_subscription(Heartbeat, "/uav1/heartbeat", lambda m: beats.append((time.monotonic(), m.sequence)), qos_profile_sensor_data)
    rclpy_node.create_subscription(BatteryHealth, "/uav2/battery", lambda m: batteries.update(uav2=m), qos_profile_sensor_data)
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    clock = SimClock(rclpy_node)
    clock.start()
    launch = procs([BIN / "aerokv", "launch", ROOT / "launch/swarm.launch.xml", "use_sim_time:=true", "--log-dir", tmp_path / "nodes"], "launch")
    launch.node_logs = tmp_path / "nodes"
    try:
        def client(srv, node):
            return rclpy_node.create_client(srv, f"{node}/{srv.__name__.replace('Parameters', '_parameters_').lower().rstrip('_')}")

        wd = "/aerokv/watchdog"
        # Detection floors are simulated seconds: at twice real time, 0.15 s of silence is 75 ms of a
        # loaded machine's time. Widened live as soon as the watchdog serves, both at once (each alone breaks max >= min).
        pair = [Parameter(name="min_declare_s", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=3.0)),
                Parameter(name="max_silence_s", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=2.0))]
        bad = call(rclpy_node, client(SetParametersAtomically, wd), SetParametersAtomically.Request(parameters=pair)).result
        assert not bad.successful and "max_silence_s" in bad.reason, bad.reason
        pair[0].value.double_value = 0.6
        assert call(rclpy_node, client(SetParametersAtomically, wd), SetParametersAtomically.Request(parameters=pair)).result.successful

        assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 4, 90), launch.output()

        # Parameters: every node's, through the rcl_interfaces services ros2 param uses.
        for node in NODES:
            names = call(rclpy_node, client(ListParameters, node), ListParameters.Request()).result.names
            assert {"use_sim_time", "log_level"} <= set(names), (node, names)
            values = call(rclpy_node, client(GetParameters, node), GetParameters.Request(names=["use_sim_time"])).values
            assert values[0].type == ParameterType.PARAMETER_BOOL and values[0].bool_value, node
        d = call(rclpy_node, client(DescribeParameters, wd), DescribeParameters.Request(names=["declare_phi", "check_period_s"])).descriptors
        assert d[0].type == ParameterType.PARAMETER_DOUBLE and not d[0].read_only and d[0].description
        assert d[0].floating_point_range[0].from_value == 0.0 and d[0].floating_point_range[0].to_value == 100.0
        assert d[1].read_only and "read-only" in d[1].additional_constraints

        def set_(node, name, **value):
            kind = {"double_value": ParameterType.PARAMETER_DOUBLE, "string_value": ParameterType.PARAMETER_STRING}[next(iter(value))]
            p = Parameter(name=name, value=ParameterValue(type=kind, **value))
            return call(rclpy_node, client(SetParameters, node), SetParameters.Request(parameters=[p])).results[0]

        # The same answer with time running twice as fast and half as fast as the wall clock.
        generate = rclpy_node.create_client(Generate, "/aerokv/generate")
        rates = {}
        for rate in (2.0, 0.5):
            clock.rate = rate
            r = call(rclpy_node, generate, Generate.Request(user=PROMPT, max_tokens=MAX_TOKENS), timeout=180)
            assert r.accepted and r.error == "", r.error
            assert list(r.token_ids) == reference["tokens"] and r.text == reference["text"], (rate, r.text)
            rates[rate] = r.tokens_per_s
        # Rates are in simulated seconds: 4x as many of them pass per real second at 2.0 as at 0.5.
        print(f"tokens per simulated second: {rates} (ratio {rates[0.5] / rates[2.0]:.2f}, 4 expected; load-dependent)")
        assert rates[2.0] < rates[0.5], rates
        clock.rate = 1.0

        assert set_(wd, "declare_phi", double_value=9.0).successful
        got = call(rclpy_node, client(GetParameters, wd), GetParameters.Request(names=["declare_phi"])).values[0]
        assert got.double_value == 9.0
        bad = set_(wd, "declare_phi", double_value=2.0)
        assert not bad.successful and "suspect_phi" in bad.reason, bad.reason
        assert "read-only" in set_(wd, "check_period_s", double_value=0.5).reason
        assert "is a double, not a string" in set_(wd, "declare_phi", string_value="high").reason
        assert not set_("/uav1/shard_executor", "log_level", string_value="loud").successful
        assert set_("/uav1/shard_executor", "log_level", string_value="debug").successful

        # A live change of the battery input: uav2 follows a BatteryState on a new topic.
        assert set_("/uav2/battery_monitor", "battery_state_topic", string_value="/test/uav2_battery").successful
        pub = rclpy_node.create_publisher(BatteryState, "/test/uav2_battery", qos_profile_sensor_data)

        def following():
            pub.publish(BatteryState(percentage=0.42, voltage=14.0, current=-6.0, present=True))
            b = batteries.get("uav2")
            return b is not None and b.source == "sensor_msgs/BatteryState" and abs(b.state_of_charge - 0.42) < 1e-3

        assert spin_until(rclpy_node, following, 20), (batteries, launch.output())

        # /diagnostics: every node's status, stamped in simulated time.
        wanted = {
            "aerokv/scheduler": {"request_id", "epoch", "members", "ring"},
            "aerokv/watchdog": {"members", "suspected", "declared"},
            "aerokv/uav1/shard_executor": {"layers", "memory_bytes", "stale_messages", "ignored_messages"},
            "aerokv/uav2/battery": {"source", "reading_age_s"},
        }
        values = lambda name: {kv.key: kv.value for kv in statuses[name][1].values} if name in statuses else {}
        assert spin_until(rclpy_node, lambda: set(wanted) <= set(statuses) and values("aerokv/uav2/battery")["source"].startswith("sensor"), 10), statuses.keys()
        for name, keys in wanted.items():
            header, status = statuses[name]
            assert keys <= set(values(name)), (name, status)
            assert SIM_START_S <= header.stamp.sec < SIM_START_S + 3600, (name, header.stamp)
        scheduler = values("aerokv/scheduler")
        assert scheduler["members"] == "uav1 uav2 uav3 uav4" and int(scheduler["epoch"]) >= 1, scheduler

        # /rosout: the nodes' own log lines, under their names.
        by_node = lambda name: [m.msg for m in logs if m.name == name]
        assert spin_until(rclpy_node, lambda: all(by_node(n) for n in ["aerokv.scheduler", "aerokv.watchdog", "uav1.shard_executor", "uav1.battery_monitor"]), 10), {m.name for m in logs}
        assert any("assignment published" in m for m in by_node("aerokv.scheduler")), by_node("aerokv.scheduler")
        assert any("parameter changed" in m and "declare_phi" in m for m in by_node("aerokv.watchdog"))

        # Time stops: no heartbeat, no timeout, no failure declared, however long the wall clock runs.
        clock.rate = 0.0
        spin_until(rclpy_node, lambda: False, 0.5)  # what was in flight
        stopped_at, declared = time.monotonic(), len(failures)
        spin_until(rclpy_node, lambda: False, 3.0)  # > max_silence_s (2 s) of wall-clock time
        assert [s for t, s in beats if t > stopped_at] == [], "heartbeats while time stood still"
        assert len(failures) == declared, failures
        clock.rate = 1.0
        assert spin_until(rclpy_node, lambda: beats[-1][0] > stopped_at + 3.0, 10), "heartbeats did not resume"
        spin_until(rclpy_node, lambda: False, 1.0)
        assert len(failures) == declared, failures
        assert launch.stop(signal.SIGINT) == 0, launch.output()
        assert launch.output().count("stopped: exit code 0") == 10, launch.output()
    finally:
        clock.done.set()
        clock.join()
