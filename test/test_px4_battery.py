"""The battery monitor follows PX4's battery over uXRCE-DDS: `px4_msgs/BatteryStatus` (PX4 v1.15,
interfaces/px4_msgs) on a vehicle's namespaced topic, with PX4's QoS (best effort, transient local,
keep last). rclpy plays PX4: it publishes the status as the uXRCE-DDS agent would. Bad readings are
refused and counted in /diagnostics; the scheduler's next plan follows the charge, and a UAV whose
autopilot says "land now" leaves the plan."""
import signal

import pytest
from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

px4_msgs = pytest.importorskip("px4_msgs.msg")
PX4_QOS = QoSProfile(reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                     history=HistoryPolicy.KEEP_LAST, depth=1)
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
CAPACITY_J = 2.7e6  # config/uav.yaml


def status(remaining, **kw):
    fields = dict(connected=True, remaining=float(remaining), voltage_v=15.2, current_a=10.0, warning=0)
    fields.update(kw)
    return px4_msgs.BatteryStatus(**fields)


def diagnostics_of(uav, got):
    return [{kv.key: kv.value for kv in s.values} | {"_level": s.level, "_message": s.message}
            for d in got for s in d.status if s.name == f"aerokv/{uav}/battery"]


def test_battery_monitor_follows_px4_on_the_vehicles_topic_and_refuses_bad_readings(rclpy_node, procs):
    from aerokv.msg import BatteryHealth
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    mine = rclpy_node.create_publisher(px4_msgs.BatteryStatus, "/px4_1/fmu/out/battery_status", PX4_QOS)
    other = rclpy_node.create_publisher(px4_msgs.BatteryStatus, "/fmu/out/battery_status", PX4_QOS)
    health, diags = [], []
    rclpy_node.create_subscription(BatteryHealth, "/uav5/battery", health.append, qos_profile_sensor_data)
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 10)
    monitor = procs([BIN / "battery_monitor", "--ros-args", "-r", "__ns:=/uav5", "--params-file", ROOT / "config/uav.yaml",
                     "-p", "source:=px4", "-p", "px4_namespace:=px4_1", "-p", "publish_period_s:=0.1"], "monitor")
    # PX4 publishes periodically; another vehicle's status (no namespace) must not be followed.
    # Until the first status arrives the monitor reports its initial charge, 1.0.
    def followed():
        mine.publish(status(0.42))
        other.publish(status(0.9))
        return [h for h in health if h.state_of_charge == pytest.approx(0.42, abs=1e-6)]

    assert spin_until(rclpy_node, followed, timeout=20), (health[-1:], monitor.output())
    h = followed()[-1]
    assert h.uav_id == "uav5" and h.source == "px4_msgs/BatteryStatus"
    assert h.energy_j == pytest.approx(0.42 * CAPACITY_J, rel=1e-6) and h.power_w == pytest.approx(152.0, rel=1e-4)

    # Bad readings change nothing and are counted; the last good reading stands.
    bad = [status(float("nan")), status(1.7), status(-1.0), status(0.3, connected=False),
           status(0.3, full_charge_capacity_wh=1e7)]

    def refused():
        for m in bad:
            mine.publish(m)
        return [d for d in diagnostics_of("uav5", diags) if int(d["rejected_readings"]) >= len(bad)]

    assert spin_until(rclpy_node, refused, timeout=10), diagnostics_of("uav5", diags)[-1:]
    d = refused()[-1]
    assert "last_rejected" in d and d["_level"] == DiagnosticStatus.WARN, d
    health.clear()
    assert spin_until(rclpy_node, lambda: len(health) >= 2, timeout=10)
    assert all(h.state_of_charge == pytest.approx(0.42, abs=1e-6) for h in health), health
    assert "refused" in monitor.output()

    # A good reading is followed again; from EMERGENCY on the UAV has nothing left for the swarm.
    def after(m, predicate):
        mine.publish(m)
        return predicate()

    low = status(0.35, warning=1)
    assert spin_until(rclpy_node, lambda: after(low, lambda: health and health[-1].state_of_charge == pytest.approx(0.35, abs=1e-6)), timeout=10)
    assert spin_until(rclpy_node, lambda: any(d.get("px4_warning") == "low" for d in diagnostics_of("uav5", diags)), timeout=10)
    assert all(h.state_of_charge != pytest.approx(0.9) for h in health), "followed another vehicle's status"
    landing = status(0.35, warning=3)
    assert spin_until(rclpy_node, lambda: after(landing, lambda: health and health[-1].energy_j == 0.0), timeout=10)
    assert monitor.stop(signal.SIGINT) == 0, monitor.output()


def test_the_next_plan_follows_px4s_charge_and_a_landing_uav_leaves_it(rclpy_node, procs, tmp_path):
    from aerokv.msg import Assignment, BatteryHealth

    def launch(name, *args):
        p = procs([BIN / "aerokv", "launch", ROOT / "launch" / name, *args, "--log-dir", tmp_path / "nodes"], name)
        p.node_logs = tmp_path / "nodes"
        return p

    px4 = rclpy_node.create_publisher(px4_msgs.BatteryStatus, "/px4_2/fmu/out/battery_status", PX4_QOS)
    control = launch("control.launch.xml", "expected_uavs:=2")
    launch("uav.launch.xml", "uav_id:=uav1")
    launch("uav.launch.xml", "uav_id:=uav2", "battery_source:=px4", "px4_namespace:=px4_2")
    latest = {}
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 2, timeout=90), control.output()
    first = latest["a"]

    def layers():
        return {u.uav_id: u.layer_end - u.layer_start for u in latest["a"].uavs}

    # Telemetry that must not reach planning: another UAV's name on uav2's topic, a NaN energy.
    hostile = rclpy_node.create_publisher(BatteryHealth, "/uav2/battery", qos_profile_sensor_data)
    scheduler_log = lambda: (tmp_path / "nodes" / "aerokv_scheduler.log").read_text(errors="replace")

    def refused():
        # Best effort, and the scheduler may match this new publisher later than the watchdog:
        # sent until it has been heard.
        for m in [BatteryHealth(uav_id="uav1", energy_j=0.0, capacity_j=CAPACITY_J),
                  BatteryHealth(uav_id="uav2", energy_j=float("nan"), capacity_j=CAPACITY_J)]:
            hostile.publish(m)
        return "telemetry refused" in scheduler_log()

    assert spin_until(rclpy_node, refused, timeout=20), control.output()
    assert "WrongUav" in scheduler_log() or "came on" in scheduler_log()

    def low_charge_plan():
        px4.publish(status(0.1))
        n = layers()
        return latest["a"].epoch > first.epoch and len(n) == 2 and n["uav2"] < n["uav1"]

    assert spin_until(rclpy_node, low_charge_plan, timeout=60), (first, latest["a"])
    assert "battery" in latest["a"].reason

    # EMERGENCY: the UAV lands; its battery reads empty and it leaves the plan.
    def landed():
        px4.publish(status(0.1, warning=3))
        return list(latest["a"].ring) == ["uav1"]

    assert spin_until(rclpy_node, landed, timeout=60), latest["a"]
    assert control.stop(signal.SIGINT) == 0, control.output()
