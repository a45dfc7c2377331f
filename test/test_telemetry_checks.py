"""Telemetry that cannot poison planning: the watchdog takes a UAV's battery report and heartbeat
only when it passes the core's check (src/control.rs). rclpy plays a UAV whose topics carry
another UAV's name and impossible figures: nothing is declared, the refusals are counted in the
log; a correctly reported empty battery is then declared once."""
from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)


def test_watchdog_refuses_bad_reports_and_declares_a_real_empty_battery_once(rclpy_node, procs):
    from aerokv.msg import BatteryHealth, FailureEvent, Heartbeat

    watchdog = procs([BIN / "watchdog", "--ros-args", "-r", "__ns:=/aerokv", "--params-file", ROOT / "config/swarm.yaml"], "watchdog")
    events = []
    rclpy_node.create_subscription(FailureEvent, "/aerokv/failures", events.append, EVENTS)
    beat = rclpy_node.create_publisher(Heartbeat, "/uav6/heartbeat", qos_profile_sensor_data)
    battery = rclpy_node.create_publisher(BatteryHealth, "/uav6/battery", qos_profile_sensor_data)
    assert spin_until(rclpy_node, lambda: beat.publish(Heartbeat(uav_id="uav6", state="ready")) or "watching uav=uav6" in watchdog.output(), 20), watchdog.output()

    bad = [
        BatteryHealth(uav_id="uav9", energy_j=0.0, capacity_j=2.7e6),        # another UAV's name
        BatteryHealth(uav_id="uav6", energy_j=-5.0, capacity_j=2.7e6),       # negative energy
        BatteryHealth(uav_id="uav6", energy_j=float("nan"), capacity_j=2.7e6),
        BatteryHealth(uav_id="uav6", energy_j=0.0, capacity_j=0.0),          # capacity 0
    ]

    def refused():
        beat.publish(Heartbeat(uav_id="uav6", state="ready"))
        beat.publish(Heartbeat(uav_id="uav6", state="ready", compute_s_total=float("inf")))
        for m in bad:
            battery.publish(m)
        out = watchdog.output()
        return "kind=BatteryHealth count=4" in out and "kind=Heartbeat count=4" in out

    assert spin_until(rclpy_node, refused, 20), watchdog.output()
    assert events == [], events

    def empty():
        beat.publish(Heartbeat(uav_id="uav6", state="ready"))
        battery.publish(BatteryHealth(uav_id="uav6", energy_j=0.0, capacity_j=2.7e6, source="simulation"))
        return events

    assert spin_until(rclpy_node, empty, 20), watchdog.output()
    assert [(e.uav_id, e.reason) for e in events] == [("uav6", "battery_empty")], events
