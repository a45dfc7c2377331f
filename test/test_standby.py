"""A scheduler that can die (docs/failure-detection.md, "The standby scheduler"), seen by rclpy's
own action client, in one keyed 2-UAV swarm with a primary and a standby scheduler:

1. the primary answers a first request; the standby follows it (its spec, its tokens, its end);
2. two requests run at once; the primary is killed (SIGKILL) mid-answers; the standby takes over,
   each client sends its goal again with its request id and the tokens it has (`resume_from`),
   and each answer goes on token for token as `aerokv generate` gives it, no token twice (the
   first on the executors' KV, the other fed again); the time from the kill to the next token is
   printed (not asserted: speed is not a test);
3. the first answer, finished under the primary, is resumed by its id from the standby;
4. a battery monitor is killed mid-answer: its executor computes on, the answer is exact.
The standby signs with its own key (`aerokv/standby_scheduler`) once it serves.
"""
import json
import os
import re
import signal
import subprocess
import time

from conftest import BIN, ROOT, spin_until
from rclpy.qos import qos_profile_sensor_data
from test_auth import keyed
from test_generate_action import EVENTS, LATCHED, SUCCEEDED, Goal

UAVS = ["uav1", "uav2"]
PROMPTS = ["What is a drone?", "Name three uses of a swarm of drones."]
MAX_TOKENS = 40


def reference(prompt):
    r = subprocess.run([BIN / "aerokv", "generate", "--user", prompt, "--max-tokens", str(MAX_TOKENS), "--json"],
                       capture_output=True, text=True, timeout=300, check=True)
    return json.loads(r.stdout)["tokens"]


def contiguous(goals):
    """The tokens of several goals of one request, each goal's feedback continuing the last."""
    out = []
    for g in goals:
        for fb in g.feedback:
            assert fb.index == len(out), ([(f.index, len(f.token_ids)) for f in g.feedback], len(out))
            out += list(fb.token_ids)
    return out


def test_the_standby_takes_over_mid_answer_and_resumes_by_id(rclpy_node, procs, tmp_path):
    from aerokv.action import Generate
    from aerokv.msg import Assignment, Heartbeat, TokenChunk
    from rclpy.action import ActionClient

    refs = [reference(p) for p in PROMPTS]
    swarm_yaml, uav_yaml = keyed(tmp_path, len(UAVS))
    sched = lambda ns, *extra: [BIN / "scheduler", "--ros-args", "-r", f"__ns:={ns}", "-r", "__node:=scheduler",
                                "--params-file", swarm_yaml, "-p", "expected_uavs:=2", *extra]
    primary = procs(sched("/aerokv"), "primary")
    standby = procs(sched("/aerokv/standby", "-p", "role:=standby"), "standby")
    procs([BIN / "watchdog", "--ros-args", "-r", "__ns:=/aerokv", "-r", "__node:=watchdog", "--params-file", swarm_yaml], "watchdog")
    uavs = {u: procs([BIN / "aerokv", "launch", ROOT / "launch/uav.launch.xml", f"uav_id:={u}", f"params_file:={uav_yaml}",
                      "--log-dir", tmp_path / u], u) for u in UAVS}

    beats, chunks, latest = {}, [], {}
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    rclpy_node.create_subscription(Heartbeat, "/aerokv/scheduler/heartbeat", lambda m: beats.update({m.uav_id: m}), qos_profile_sensor_data)
    rclpy_node.create_subscription(TokenChunk, "/aerokv/tokens", chunks.append, EVENTS)
    client = ActionClient(rclpy_node, Generate, "/aerokv/generate")
    assert client.wait_for_server(timeout_sec=120), primary.output()
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 2, 120), primary.output()
    assert spin_until(rclpy_node, lambda: beats.get("standby") and beats["standby"].state == "following", 60), standby.output()
    goal = lambda prompt, **kw: Goal(rclpy_node, client, user=prompt, max_tokens=MAX_TOKENS, **kw)

    # 1. The primary answers; the standby follows.
    first = goal(PROMPTS[0])
    r = first.wait(180)
    assert first.status == SUCCEEDED and list(r.token_ids) == refs[0], (r.error, primary.output())
    assert beats["primary"].state == "serving" and beats["primary"].auth.sender == "aerokv/scheduler"

    # 2. The primary dies with two answers in flight; each client resumes from the standby by id.
    second, beside = goal(PROMPTS[1]), goal(PROMPTS[0])
    second.handle(), beside.handle()
    assert spin_until(rclpy_node, lambda: len(contiguous([second])) >= 8 and len(contiguous([beside])) >= 2, 120), \
        primary.output()
    rid, have = second.feedback[0].request_id, len(contiguous([second]))
    rid_beside, have_beside = beside.feedback[0].request_id, len(contiguous([beside]))
    assert primary.stop(signal.SIGKILL) is not None
    killed_at = time.monotonic()
    assert spin_until(rclpy_node, lambda: beats["standby"].state == "serving", 10), standby.output()
    took_over = time.monotonic()

    def resume(prompt, request_id, start):
        while time.monotonic() - took_over < 30:
            # A goal sent before the standby's action server is matched is lost: sent again.
            g = goal(prompt, request_id=request_id, resume_from=start)
            if spin_until(rclpy_node, g.send.done, 0.5):
                return g
        raise AssertionError(standby.output())

    resumed, resumed_beside = resume(PROMPTS[1], rid, have), resume(PROMPTS[0], rid_beside, have_beside)
    assert spin_until(rclpy_node, lambda: resumed.feedback, 30), standby.output()
    next_token_s = time.monotonic() - killed_at
    r = resumed.wait(180)
    assert resumed.status == SUCCEEDED and r.error == "", (r.error, standby.output())
    # rclpy drops a goal's feedback taken after its result (another topic): the feedback may end
    # early, each token once and in order; the result is the whole answer.
    fed = contiguous([second, resumed])
    assert list(r.token_ids) == refs[1] and len(fed) > have and fed == refs[1][:len(fed)], (r.text, standby.output())
    r_beside = resumed_beside.wait(180)
    assert resumed_beside.status == SUCCEEDED and list(r_beside.token_ids) == refs[0], (r_beside.error, standby.output())
    fed = contiguous([beside, resumed_beside])
    assert fed == refs[0][:len(fed)] and len(fed) > have_beside
    stats = json.loads(r.stats_json)
    takeover = [i for i in stats["incidents"] if i["mode"] == "takeover"]
    assert takeover and takeover[0]["token"] >= have, stats["incidents"]
    assert min(stats["epochs"]) > 0
    # The standby now beats as the serving scheduler, and signs as itself.
    assert beats["standby"].auth.sender == "aerokv/standby_scheduler"
    own = lambda: [c for c in chunks if c.request_id == rid and c.auth.sender == "aerokv/standby_scheduler"]
    # The last chunk may come after the result (another topic).
    assert spin_until(rclpy_node, lambda: own() and own()[-1].done, 10), own()
    assert own()[-1].finish_reason == "length" and own()[0].index >= have
    log = standby.output()
    assert "PRIMARY SILENT" in log and "resuming the primary's running request" in log
    print(f"\nprimary killed after {have} tokens: standby serving after {took_over - killed_at:.3f} s, "
          f"next token at the client after {next_token_s:.3f} s (the scheduler's takeover: {takeover[0]['why']}; "
          f"resumed at position {takeover[0]['resume_position']}, 0: fed again)")

    # 3. The first answer, finished under the primary, resumed from the standby by id.
    late = goal(PROMPTS[0], request_id=first.feedback[0].request_id, resume_from=5)
    r = late.wait(30)
    assert late.status == SUCCEEDED and list(r.token_ids) == refs[0], r.error
    got = late.tokens()
    assert late.first_index() == 5 and got and got == refs[0][5:5 + len(got)]

    # 4. A battery monitor dies mid-answer: the drone's executor computes on, the answer is exact.
    third = goal(PROMPTS[0])
    third.handle()
    assert spin_until(rclpy_node, lambda: len(third.feedback) >= 4, 60)
    pid = int(re.search(r"/uav2/battery_monitor \(pid (\d+)\)", uavs["uav2"].output())[1])
    os.kill(pid, signal.SIGKILL)  # a process this test started (through its launcher)
    r = third.wait(120)
    assert third.status == SUCCEEDED and list(r.token_ids) == refs[0], (r.error, standby.output())
    assert third.tokens() == refs[0]
