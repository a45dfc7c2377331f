"""Authenticated members and messages (docs/security.md), seen by an independent ROS 2 program.

A real swarm runs with a keystore made by `aerokv keys init`. While it answers a request, rclpy
(holding no key) publishes forged plans and forged failure declarations: unsigned, signed with
garbage, signed by the wrong role, by a stranger, and a replay of the genuine plan. The answer
must be token for token the one `aerokv generate` gives, and every forgery must be counted by
its reason in the executors' heartbeats and the scheduler's `/diagnostics`.
"""
import json
import os
import signal
import subprocess

import pytest
from conftest import BIN, ROOT, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
DATA_PLANE = QoSProfile(depth=8, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
SENSOR = qos_profile_sensor_data
UAVS = ["uav1", "uav2", "uav3", "uav4"]
PROMPT = "What is a drone?"
MAX_TOKENS = 48
REASONS = ["not_signed", "unknown_sender", "wrong_role", "bad_signature", "replayed", "malformed"]
# /diagnostics names the reasons as the Rejection enum does (AuthCounters says not_signed: `unsigned` is a C keyword)
DIAG = {r: "unsigned" if r == "not_signed" else r for r in REASONS}


def keys(*args):
    return subprocess.run([BIN / "aerokv", "keys", *map(str, args)], capture_output=True, text=True, timeout=60)


def keyed(tmp_path, uavs):
    """A keystore for `uavs` UAVs, and copies of config/swarm.yaml and config/uav.yaml using it."""
    ks = tmp_path / "ks"
    assert keys("init", "--uavs", uavs, ks).returncode == 0
    out = []
    for config in ["swarm.yaml", "uav.yaml"]:
        text = (ROOT / "config" / config).read_text()
        assert 'keystore: ""' in text, config
        (tmp_path / config).write_text(text.replace('keystore: ""', f'keystore: "{ks}"'))
        out.append(tmp_path / config)
    return out


@pytest.fixture(scope="module")
def reference():
    """The one-process answer (`aerokv generate`)."""
    r = subprocess.run([BIN / "aerokv", "generate", "--user", PROMPT, "--max-tokens", str(MAX_TOKENS), "--json"],
                       capture_output=True, text=True, timeout=300, check=True)
    return json.loads(r.stdout)


def test_keys_init_show_and_refusals(tmp_path):
    ks = tmp_path / "ks"
    r = keys("init", "--uavs", 2, ks)
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(ks / "private/uav1/shard_executor.pem").st_mode & 0o777) == "0o600"
    assert oct(os.stat(ks / "private").st_mode & 0o777) == "0o700"
    again = keys("init", "--uavs", 2, ks)
    assert again.returncode != 0 and "--force" in again.stderr
    show = keys("show", ks)
    assert show.returncode == 0 and "UAVs on the roster: uav1 uav2" in show.stdout, show.stdout
    os.chmod(ks / "private/uav2/battery_monitor.pem", 0o644)
    show = keys("show", ks)
    assert show.returncode != 0 and "uav2/battery_monitor.pem: private key is accessible" in show.stdout


def test_forged_plans_and_failure_declarations_are_dropped_and_counted(rclpy_node, procs, reference, tmp_path):
    from aerokv.msg import Activation, Assignment, Auth, BatteryHealth, FailureEvent, Heartbeat, UavAssignment
    from aerokv.srv import Generate
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    swarm_yaml, uav_yaml = keyed(tmp_path, len(UAVS))
    logs = tmp_path / "nodes"
    launches = [procs([BIN / "aerokv", "launch", ROOT / "launch/control.launch.xml", f"params_file:={swarm_yaml}",
                       "expected_uavs:=4", "--log-dir", logs], "control")]
    for uav in UAVS:
        launches.append(procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", f"uav_id:={uav}",
                               f"params_file:={uav_yaml}", "--log-dir", logs / uav], uav))

    latest, beats, diags = {}, {}, {}
    # (this node hears its own forgeries and replay too: keep the scheduler's newest plan)
    newest = lambda m: m.reason != "forged" and ("a" not in latest or m.epoch > latest["a"].epoch)
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment",
                                   lambda m: latest.update(a=m) if newest(m) else None, LATCHED)
    for uav in UAVS:
        rclpy_node.create_subscription(Heartbeat, f"/{uav}/heartbeat", lambda m, u=uav: beats.update({u: m}),
                                       qos_profile_sensor_data)
    rclpy_node.create_subscription(DiagnosticArray, "/diagnostics",
                                   lambda m: diags.update({s.name: s for s in m.status}), 10)
    # Genuine messages, to be replayed later: a stage output to the gateway, a battery report.
    genuine_out, genuine_battery = {}, {}
    rclpy_node.create_subscription(Activation, "/aerokv/gateway/input",
                                   lambda m: genuine_out.update(a=m) if m.auth.signature else None, DATA_PLANE)
    rclpy_node.create_subscription(BatteryHealth, "/uav1/battery",
                                   lambda m: genuine_battery.update(b=m) if m.auth.signature else None, qos_profile_sensor_data)
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 4, 90), launches[0].output()
    genuine = latest["a"]
    assert genuine.auth.sender == "aerokv/scheduler" and len(genuine.auth.signature) == 64

    plans = rclpy_node.create_publisher(Assignment, "/aerokv/assignment", LATCHED)
    failures = rclpy_node.create_publisher(FailureEvent, "/aerokv/failures", EVENTS)
    # every executor and the watchdog read plans; the scheduler reads failure declarations
    assert spin_until(rclpy_node, lambda: plans.get_subscription_count() >= 5 and failures.get_subscription_count() >= 1, 20)

    client = rclpy_node.create_client(Generate, "/aerokv/generate")
    assert client.wait_for_service(timeout_sec=30)
    future = client.call_async(Generate.Request(user=PROMPT, max_tokens=MAX_TOKENS))

    # A plan that hands every layer to uav1 at a much higher epoch: the whole swarm would follow it.
    takeover = Assignment(epoch=genuine.epoch + 100, model_variant=genuine.model_variant, num_layers=30, ring=["uav1"],
                          uavs=[UavAssignment(uav_id="uav1", layer_start=0, layer_end=30, overlap_layers=30)],
                          reason="forged")
    forged_plans = {
        "not_signed": Auth(),
        "bad_signature": Auth(sender="aerokv/scheduler", counter=2**62, signature=bytes(range(64))),
        "wrong_role": Auth(sender="uav1/shard_executor", counter=2**62, signature=bytes(64)),
        "unknown_sender": Auth(sender="uav9/shard_executor", counter=2**62, signature=bytes(64)),
        "malformed": Auth(sender="aerokv/scheduler", counter=2**62, signature=bytes(5)),
    }

    def counters(uav):
        c = beats[uav].auth_counters
        return {k: getattr(c, k) for k in ["accepted", *REASONS]}

    def counted(reason):
        return lambda: all(u in beats and counters(u)[reason] >= 1 for u in UAVS)

    def publish_until(msg, reason):
        # The plan topic keeps one message per reader, whoever wrote it: a forgery that arrives
        # just before a genuine plan can be replaced unread. Sent again until every executor saw it.
        for _ in range(40):
            plans.publish(msg)
            if spin_until(rclpy_node, counted(reason), 0.5):
                return
        pytest.fail(f"{reason}: not counted by every executor: { {u: counters(u) for u in beats} }")

    for reason, auth in forged_plans.items():
        takeover.auth = auth
        publish_until(takeover, reason)
    publish_until(genuine, "replayed")  # the genuine plan, sent again
    # Declarations that uav2 and uav3 have failed: the scheduler would recover from them.
    declarations = {
        "not_signed": Auth(),
        "bad_signature": Auth(sender="aerokv/watchdog", counter=2**62, signature=bytes(range(64))),
        "wrong_role": Auth(sender="aerokv/scheduler", counter=2**62, signature=bytes(64)),
    }
    for i, auth in enumerate(declarations.values()):
        failures.publish(FailureEvent(epoch=genuine.epoch, uav_id=UAVS[1 + i % 2], reason="heartbeat_timeout",
                                      silence_s=9.0, auth=auth))

    assert spin_until(rclpy_node, future.done, timeout=180), launches[0].output()
    r = future.result()
    assert r.accepted and r.error == "", r.error
    assert list(r.token_ids) == reference["tokens"] and r.text == reference["text"]
    stats = json.loads(r.stats_json)
    assert [s["uav"] for s in stats["layout"]] == list(genuine.ring), stats["layout"]

    # Nothing forged was applied: the executors follow the scheduler's epoch, not the forged one
    # (they accept its plans and their neighbours' signed activations and KV rows).
    genuine_epochs = latest["a"].epoch
    assert genuine_epochs < takeover.epoch
    for u in UAVS:
        assert counters(u)["accepted"] >= 1 and beats[u].epoch <= genuine_epochs, (u, beats[u])

    def diag(name):
        values = {kv.key: kv.value for kv in diags[name].values} if name in diags else {}
        return {r: int(values[DIAG[r]]) for r in REASONS if DIAG[r] in values}

    # The watchdog reads plans too; the scheduler reads the failure declarations.
    watchdog = "aerokv/auth/aerokv/watchdog"
    assert spin_until(rclpy_node, lambda: all(diag(watchdog).get(k, 0) >= 1 for k in REASONS), 10), diag(watchdog)
    scheduler = "aerokv/auth/aerokv/scheduler"
    dropped = {"not_signed": 1, "bad_signature": 1, "wrong_role": 1, "unknown_sender": 0, "replayed": 0, "malformed": 0}
    assert spin_until(rclpy_node, lambda: diag(scheduler) == dropped, 10), diag(scheduler)
    assert diags[scheduler].level == DiagnosticStatus.WARN and "3 message(s) dropped" in diags[scheduler].message
    assert stats["auth"]["accepted"] > 0, stats["auth"]

    # Every other kind of message, forged or replayed while the next request runs: each one is
    # published until the node that reads it has counted it under its reason.
    future = client.call_async(Generate.Request(user=PROMPT, max_tokens=MAX_TOKENS))
    publishers = {}

    def pub(kind, topic, qos):
        if topic not in publishers:
            publishers[topic] = rclpy_node.create_publisher(kind, topic, qos)
        return publishers[topic]

    def executor_count(uav, reason):
        return counters(uav)[reason] if uav in beats else 0

    def forge(kind, topic, qos, msg, reason, reader):
        # reader: the /diagnostics status of the node that must count it, or an executor's UAV id
        count = (lambda: executor_count(reader, reason)) if reader in UAVS else (lambda: diag(reader).get(reason, 0))
        before, p = count(), pub(kind, topic, qos)
        for _ in range(30):
            p.publish(msg)
            if spin_until(rclpy_node, lambda: count() > before, 1.0):
                return
        pytest.fail(f"{topic} {reason}: not counted by {reader}: {diag(reader) if reader not in UAVS else counters(reader)}")

    assert spin_until(rclpy_node, lambda: "a" in genuine_out and "b" in genuine_battery, 30)
    out = genuine_out["a"]
    garbage = lambda sender: Auth(sender=sender, counter=2**62, signature=bytes(range(64)))
    forged_output = lambda auth, **kw: Activation(**{**{f: getattr(out, f) for f in out.get_fields_and_field_types()},
                                                     "epoch": out.epoch + 1000, "auth": auth, **kw})
    gateway, battery_of, heartbeat_of = "/aerokv/gateway/input", "/{}/battery".format, "/{}/heartbeat".format
    cases = [
        # stage outputs reaching the gateway (the answer's next token): unsigned, attributed to
        # another UAV than the signer, signed with garbage, and a genuine one replayed
        (Activation, gateway, DATA_PLANE, forged_output(Auth()), "not_signed", scheduler),
        (Activation, gateway, DATA_PLANE, forged_output(garbage("uav1/shard_executor"), source="uav2"), "wrong_role", scheduler),
        (Activation, gateway, DATA_PLANE, forged_output(garbage(f"{out.source}/shard_executor")), "bad_signature", scheduler),
        (Activation, gateway, DATA_PLANE, out, "replayed", scheduler),
        # a stage input to uav1, posing as the gateway
        (Activation, "/uav1/input", DATA_PLANE, forged_output(garbage("aerokv/watchdog"), source="gateway"), "wrong_role", "uav1"),
        # heartbeat and battery of a UAV that is not on the roster
        (Heartbeat, heartbeat_of("uav9"), SENSOR, Heartbeat(uav_id="uav9", sequence=1, state="ready",
                                                            auth=garbage("uav9/shard_executor")), "unknown_sender", watchdog),
        (BatteryHealth, battery_of("uav9"), SENSOR, BatteryHealth(uav_id="uav9", energy_j=1e6, capacity_j=2e6), "not_signed", watchdog),
        # absurd telemetry for roster UAVs: an empty battery that would retire uav3, a heartbeat
        # that would keep uav2 "alive" with a huge epoch
        (BatteryHealth, battery_of("uav3"), SENSOR, BatteryHealth(uav_id="uav3", energy_j=float("nan"), capacity_j=-1.0),
         "not_signed", scheduler),
        (Heartbeat, heartbeat_of("uav2"), SENSOR, Heartbeat(uav_id="uav2", epoch=2**63, sequence=2**40, state="ready",
                                                            auth=garbage("uav2/shard_executor")), "bad_signature", scheduler),
        (Heartbeat, heartbeat_of("uav2"), SENSOR, Heartbeat(uav_id="uav2", epoch=2**63, auth=garbage("uav1/shard_executor")),
         "wrong_role", watchdog),
        # genuine telemetry replayed
        (Heartbeat, heartbeat_of("uav1"), SENSOR, beats["uav1"], "replayed", scheduler),
        (BatteryHealth, battery_of("uav1"), SENSOR, genuine_battery["b"], "replayed", watchdog),
    ]
    for case in cases:
        forge(*case)
    assert spin_until(rclpy_node, future.done, timeout=180), launches[0].output()
    r = future.result()
    assert r.accepted and list(r.token_ids) == reference["tokens"], (r.error, r.text)
    assert "uav9" not in {s["uav"] for s in json.loads(r.stats_json)["layout"]}
    # the next request after all of it
    again = client.call_async(Generate.Request(user=PROMPT, max_tokens=MAX_TOKENS))
    assert spin_until(rclpy_node, again.done, timeout=180), launches[0].output()
    assert list(again.result().token_ids) == reference["tokens"], again.result().error
    assert all(beats[u].epoch < 2**63 for u in UAVS)

    for launch in launches:
        assert launch.stop(signal.SIGINT) == 0, launch.output()
    assert "authentication on" in (logs / "aerokv_scheduler.log").read_text()
    assert "message dropped" in (logs / "uav1" / "uav1_shard_executor.log").read_text()


def test_a_uav_off_the_roster_is_never_planned(rclpy_node, procs, tmp_path):
    """uav3 runs with the others but is not on the roster (a keystore for two UAVs): the plan is
    made over uav1 and uav2 only."""
    from aerokv.msg import Assignment

    swarm_yaml, uav_yaml = keyed(tmp_path, 2)
    logs = tmp_path / "nodes"
    control = procs([BIN / "aerokv", "launch", ROOT / "launch/control.launch.xml", f"params_file:={swarm_yaml}",
                     "expected_uavs:=2", "--log-dir", logs], "control")
    for uav in ["uav1", "uav2"]:
        procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", f"uav_id:={uav}", f"params_file:={uav_yaml}",
               "--log-dir", logs / uav], uav)
    # The intruder has no key: it runs unauthenticated (its own executor would refuse a keystore without its key).
    intruder = procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", "uav_id:=uav3", "--log-dir", logs / "uav3"], "uav3")
    latest = {}
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    assert spin_until(rclpy_node, lambda: "a" in latest, 90), control.output()
    refused = lambda: any("uav=uav3" in line and "not on the roster" in line for line in scheduler_log(logs).splitlines())
    assert spin_until(rclpy_node, refused, 60), scheduler_log(logs)
    # Longer than the idle re-plan period (1 s): membership did not change, nor did the plan.
    spin_until(rclpy_node, lambda: False, 3)
    assert sorted(latest["a"].ring) == ["uav1", "uav2"], latest["a"]
    assert intruder.stop(signal.SIGINT) == 0
    assert control.stop(signal.SIGINT) == 0, control.output()


def scheduler_log(logs):
    f = logs / "aerokv_scheduler.log"
    return f.read_text() if f.exists() else ""


def test_a_keyed_swarm_fails_over_on_the_watchdogs_signed_declaration(ros_domain, reference, tmp_path):
    """The genuine path with keys: uav2 is killed, the watchdog's signed declaration is accepted,
    the swarm fails over and the answer is still exactly the one-process answer."""
    swarm_yaml, uav_yaml = keyed(tmp_path, len(UAVS))
    r = subprocess.run([BIN / "aerokv", "swarm", "--json", "--uavs", "4", "--user", PROMPT, "--max-tokens", str(MAX_TOKENS),
                        "--kill", "uav2:10", "--swarm-params", swarm_yaml, "--uav-params", uav_yaml,
                        "--log-dir", tmp_path / "logs"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    a = json.loads(r.stdout)
    assert a["tokens"] == reference["tokens"], (a["text"], reference["text"])
    assert [f["uav"] for f in a["failures"]] == ["uav2"] and a["failures"][0]["detection_s"] > 0, a["failures"]
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert "authentication on" in logs["aerokv_scheduler.log"] and "failure noted" in logs["aerokv_scheduler.log"]
    assert not any("message dropped" in text for text in logs.values())
