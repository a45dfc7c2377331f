"""A control plane that can lose its scheduler and its watchdog (docs/design.md "Epochs",
docs/security.md §5), seen by an independent ROS 2 program, in one keyed 4-UAV swarm:

1. the scheduler process is killed between two requests and started again: it learns the swarm's
   epoch from the executors' heartbeats, plans above it, and the next request gives the exact
   answer;
2. the watchdog is killed, the scheduler notices (/diagnostics, stats), then an executor is
   killed mid-answer: the scheduler's own detector declares it, the swarm fails over, and the
   answer is still token for token the one `aerokv generate` gives.
Every message seen here is signed by the member it names.
"""
import json
import os
import re
import signal
import subprocess

from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from test_auth import keyed

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
UAVS = ["uav1", "uav2", "uav3", "uav4"]
PROMPT = "What is a drone?"
MAX_TOKENS = 48


def test_scheduler_restart_and_watchdog_death(rclpy_node, procs, tmp_path):
    from aerokv.msg import Assignment, Heartbeat, TokenChunk
    from aerokv.srv import Generate
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    ref = subprocess.run([BIN / "aerokv", "generate", "--user", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"],
                         capture_output=True, text=True, timeout=300, check=True)
    reference = json.loads(ref.stdout)["tokens"]
    swarm_yaml, uav_yaml = keyed(tmp_path, len(UAVS))
    node = lambda exe: [BIN / exe, "--ros-args", "-r", "__ns:=/aerokv", "-r", f"__node:={exe}", "--params-file", swarm_yaml]
    scheduler = procs([*node("scheduler"), "-p", "expected_uavs:=4"], "scheduler")
    watchdog = procs(node("watchdog"), "watchdog")
    uavs = {u: procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", f"uav_id:={u}", f"params_file:={uav_yaml}",
                      "--log-dir", tmp_path / u], u) for u in UAVS}

    latest, beats, diags, tokens = {}, {}, {}, []
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    for u in UAVS:
        rclpy_node.create_subscription(Heartbeat, f"/{u}/heartbeat", lambda m, u=u: beats.update({u: m}), qos_profile_sensor_data)
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.update({s.name: s for s in m.status}), 10)
    rclpy_node.create_subscription(TokenChunk, "/aerokv/tokens", tokens.append, EVENTS)
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 4, 120), scheduler.output()

    def generate():
        client = rclpy_node.create_client(Generate, "/aerokv/generate")
        assert client.wait_for_service(timeout_sec=60)
        return client.call_async(Generate.Request(user=PROMPT, max_tokens=MAX_TOKENS))

    def answer(future, timeout=180):
        assert spin_until(rclpy_node, future.done, timeout), scheduler.output()
        r = future.result()
        assert r.accepted and r.error == "", r.error
        assert list(r.token_ids) == reference, (r.text, r.stats_json)
        return r, json.loads(r.stats_json)

    first, stats = answer(generate())
    before = max(stats["epochs"])
    # Everything on the wire is signed by the member it names.
    assert all(b.auth.sender == f"{u}/shard_executor" and len(b.auth.signature) == 64 for u, b in beats.items())
    assert all(t.auth.sender == "aerokv/scheduler" and len(t.auth.signature) == 64 for t in tokens)
    assert all(b.auth_counters.accepted > 0 and b.auth_counters.bad_signature == 0 for b in beats.values())
    assert stats["auth"]["accepted"] > 0 and stats["auth"]["bad_signature"] == 0, stats["auth"]

    # 1. The scheduler dies between requests and a new process takes its place: it knows nothing.
    assert scheduler.stop(signal.SIGKILL) is not None
    latest.clear()
    scheduler = procs([*node("scheduler"), "-p", "expected_uavs:=4"], "scheduler-again")
    assert spin_until(rclpy_node, lambda: "a" in latest, 120), scheduler.output()
    assert latest["a"].epoch > before, (latest["a"].epoch, before)  # above the swarm's, learnt from the heartbeats
    second, stats = answer(generate())
    assert min(stats["epochs"]) > before and second.request_id > first.request_id, (stats["epochs"], before)

    # 2. The watchdog dies: the scheduler says so and detects failures itself.
    assert watchdog.stop(signal.SIGKILL) is not None
    liveness = "aerokv/watchdog/liveness"
    assert spin_until(rclpy_node, lambda: liveness in diags and diags[liveness].level == DiagnosticStatus.ERROR, 10), diags.get(liveness)
    tokens.clear()
    future = generate()
    assert spin_until(rclpy_node, lambda: len([t for t in tokens if t.request_id > second.request_id]) >= 8, 120)
    pid = int(re.search(r"/uav2/shard_executor \(pid (\d+)\)", uavs["uav2"].output())[1])
    os.kill(pid, signal.SIGKILL)  # a process this test started (through its launcher)
    third, stats = answer(future)
    handled = {i["uav"]: i for i in stats["incidents"]}
    assert "uav2" in handled, stats["incidents"]
    assert handled["uav2"]["mode"] == "failover" or "another failure" in handled["uav2"]["why"], stats["incidents"]
    assert not stats["watchdog"]["watchdog_alive"] and stats["watchdog"]["fallback_declarations"] >= 1, stats["watchdog"]
    assert "uav2" not in {s["uav"] for s in stats["layout"]}
    log = scheduler.output()
    assert "WATCHDOG SILENT" in log and "declared failed by the scheduler" in log


def test_a_node_that_fails_at_start_up_ends_launch_and_swarm_at_once(ros_domain, tmp_path):
    """A bad value in a parameter file: `aerokv launch` and `aerokv swarm` end at once (long before
    their ready timeout) naming the node, its exit, the file and line that set the key (not the
    launch's own `-p` overrides), and the node's last log lines."""
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "config/swarm.yaml").read_text()
    assert "step_timeout_s: 30.0" in text
    bad.write_text(text.replace("step_timeout_s: 30.0", "step_timeout_s: -5.0"))
    line = next(i + 1 for i, l in enumerate(bad.read_text().splitlines()) if "step_timeout_s" in l)
    cause = f"cause: parameter `step_timeout_s`, set by {bad}:{line}"
    launch = subprocess.run([BIN / "aerokv", "launch", ROOT / "launch/control.launch.xml", f"params_file:={bad}",
                             "expected_uavs:=4", "--log-dir", tmp_path / "launch"], capture_output=True, text=True, timeout=60)
    assert launch.returncode != 0, launch.stderr
    assert "/aerokv/scheduler exited during start-up: exit code 1" in launch.stderr and cause in launch.stderr, launch.stderr
    assert "must be positive, not -5" in launch.stderr and "last lines of" in launch.stderr, launch.stderr
    swarm = subprocess.run([BIN / "aerokv", "swarm", "--uavs", "1", "--swarm-params", bad, "--user", PROMPT,
                            "--ready-timeout-s", "600", "--log-dir", tmp_path / "swarm"], capture_output=True, text=True, timeout=120)
    assert swarm.returncode != 0 and cause in swarm.stderr, swarm.stderr
