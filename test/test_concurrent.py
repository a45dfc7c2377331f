"""Several clients at once (docs/generate-api.md, "Concurrency and admission"), against one real
swarm (three UAVs, the q4 model, DDS over shared memory) with a small memory budget per UAV:

- three rclpy action clients send different prompts with different sampling seeds at the same
  time; the three run at once (their steps interleaved) and every answer equals `aerokv generate`
  with the same options (one process);
- the same with a UAV killed in the middle of the answers: every request in flight fails over
  (one plan carries each at its own resume point) and every answer is still identical;
- one of two running requests is canceled: it stops there, the other's answer is unchanged;
- a request whose KV could never fit a UAV's memory (weights + prompt + max_tokens) is refused
  with the UAV and the bytes;
- the executors' heartbeats account their memory: weights of the layers they hold, and the
  bytes of the request they serve.
"""
import json
import os
import re
import signal
import subprocess

import pytest
from conftest import BIN, MODELS, launch_swarm, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

# (prompt, temperature, seed): greedy and sampled answers, each its own.
CASES = [
    ("What is a drone?", 0.0, 0),
    ("Name three uses of a swarm of drones.", 0.8, 7),
    ("Why do drones need batteries?", 0.8, 11),
]
KILL_CASES = [(p, t, s + 100) for p, t, s in CASES]
MAX_TOKENS = 32
# The idle plan is made for 64 tokens; 100 MB per UAV hold any layout's weights (81 MB for all 30
# layers of q4) with the KV of these requests, never that of an 8,000-token answer (>= 10 layers on
# the most loaded of three UAVs: 27 MB of weights + 123 MB of KV).
BUDGET = 100_000_000
HUGE_TOKENS = 8000
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
SUCCEEDED, CANCELED, ABORTED = 4, 5, 6  # action_msgs/GoalStatus


def options(temperature, seed):
    return ["--temperature", str(temperature), "--top-p", "0.9", "--seed", str(seed)] if temperature > 0 else []


@pytest.fixture(scope="module")
def reference():
    """Every case's answer from one process: (prompt, temperature, seed) -> answer."""
    out = {}
    for prompt, temperature, seed in CASES + KILL_CASES:
        r = subprocess.run([BIN / "aerokv", "generate", "--user", prompt, "--max-tokens", str(MAX_TOKENS), "--json",
                            *options(temperature, seed)], capture_output=True, text=True, timeout=300, check=True)
        out[prompt, temperature, seed] = json.loads(r.stdout)
    return out


class Goal:
    def __init__(self, node, client, prompt, temperature, seed, max_tokens=MAX_TOKENS):
        from aerokv.action import Generate

        self.node, self.feedback, self.case = node, [], (prompt, temperature, seed)
        goal = Generate.Goal(user=prompt, max_tokens=max_tokens, temperature=temperature,
                             top_p=0.9 if temperature > 0 else 0.0, seed=seed)
        self.send = client.send_goal_async(goal, feedback_callback=lambda m: self.feedback.append(m.feedback))

    def wait(self, timeout=180):
        assert spin_until(self.node, self.send.done, timeout=30)
        h = self.send.result()
        assert h.accepted
        self.handle = h
        result = h.get_result_async()
        assert spin_until(self.node, result.done, timeout=timeout)
        r = result.result()
        return r.status, r.result


def test_concurrent_clients_kill_and_admission(rclpy_node, procs, reference, tmp_path):
    from aerokv.action import Generate
    from aerokv.msg import Assignment, Heartbeat
    from rclpy.action import ActionClient

    control, uavs = launch_swarm(procs, tmp_path, ["uav1", "uav2", "uav3"], memory_budget_bytes=float(BUDGET),
                                 plan_tokens=64, max_tokens_limit=HUGE_TOKENS)
    latest, beats, busiest = {}, {}, {}

    def beat(m):
        beats[m.uav_id] = m
        # The beat that held the most requests' KV (executors free a request's when it ends).
        if len(m.kv) >= len(busiest.get(m.uav_id, m).kv):
            busiest[m.uav_id] = m

    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    for u in uavs:
        rclpy_node.create_subscription(Heartbeat, f"/{u}/heartbeat", beat, qos_profile_sensor_data)
    # The KV capacity every stage input (the gateway's and each executor's) carries, per request.
    from aerokv.msg import Activation
    sized = {}
    for u in uavs:
        rclpy_node.create_subscription(Activation, f"/{u}/input",
                                       lambda m: sized.setdefault(m.request_id, set()).add(m.context_tokens),
                                       QoSProfile(depth=64, reliability=ReliabilityPolicy.RELIABLE))
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 3, 90), control.output()
    client = ActionClient(rclpy_node, Generate, "/aerokv/generate")
    assert client.wait_for_server(timeout_sec=30)

    # -- Memory accounted: each executor's weights are its native and replica layers, once each.
    manifest = json.loads((MODELS / "q4" / "manifest.json").read_text())
    layer_bytes = {f["start"]: f["weight_bytes"] for f in manifest["files"] if f["kind"] == "layers"}
    plan = {u.uav_id: u for u in latest["a"].uavs}

    def planned_weights(uav):
        ring = list(latest["a"].ring)
        me, succ = plan[uav], plan[ring[(ring.index(uav) + 1) % len(ring)]]
        layers = {(me.layer_start + i) % 30 for i in range(me.layer_end - me.layer_start)}
        layers |= {(succ.layer_start + i) % 30 for i in range(succ.overlap_layers)}
        return sum(layer_bytes[l] for l in layers)

    weights_reported = lambda: all(u in beats and beats[u].epoch == latest["a"].epoch
                                   and beats[u].weight_bytes == planned_weights(u) for u in uavs)
    assert spin_until(rclpy_node, weights_reported, 30), {u: (b.weight_bytes, planned_weights(u)) for u, b in beats.items()}

    # -- Refused: an answer whose KV would never fit, with the UAV and the bytes.
    status, r = Goal(rclpy_node, client, CASES[0][0], 0.0, 0, max_tokens=HUGE_TOKENS).wait(timeout=60)
    assert status == ABORTED and not r.accepted and r.finish_reason == "refused", (status, r.error)
    m = re.search(r"(uav\d) cannot hold this request: .* need (\d+) bytes, its memory budget is (\d+) bytes", r.error)
    assert m and m[1] in uavs and int(m[2]) > BUDGET and int(m[3]) == BUDGET, r.error

    def exact(goals):
        results = []
        for g in goals:
            status, r = g.wait()
            ref = reference[g.case]
            assert status == SUCCEEDED and r.accepted, (g.case, r.error, control.output())
            assert list(r.token_ids) == ref["tokens"] and r.text == ref["text"], (g.case, r.text, ref["text"])
            results.append(r)
        return results

    # -- Three clients at once: each answer is its own, as if it ran alone.
    goals = [Goal(rclpy_node, client, *case) for case in CASES]
    results = exact(goals)
    peaks = [json.loads(r.stats_json)["peak_running"] for r in results]
    assert peaks == [3, 3, 3], peaks
    # Each request's caches are sized for it: every stage input carried prompt + max_tokens.
    want = {r.request_id: {min(len(r.prompt_ids) + MAX_TOKENS, 8192)} for r in results}
    assert {i: sized.get(i) for i in want} == want, (sized, want)
    # Memory accounted per request: while they ran, each executor held the three requests' KV.
    held = {u: sorted(k.request_id for k in b.kv) for u, b in busiest.items()}
    assert all(len(ids) == 3 for ids in held.values()) and len(held) == 3, held
    assert all(b.memory_bytes == b.weight_bytes + sum(k.kv_bytes for k in b.kv) for b in busiest.values())
    assert all(k.kv_bytes > 0 for b in busiest.values() for k in b.kv), held
    # Each request's end (/aerokv/finished) frees its caches on every executor.
    assert spin_until(rclpy_node, lambda: all(u in beats and not beats[u].kv for u in uavs), 10), \
        {u: [k.request_id for k in b.kv] for u, b in beats.items()}

    # -- One of two running requests is canceled: it stops, the other goes on exactly.
    kept, dropped = Goal(rclpy_node, client, *CASES[0]), Goal(rclpy_node, client, *CASES[1])
    assert spin_until(rclpy_node, lambda: len(dropped.feedback) >= 3, 120), control.output()
    cancel = dropped.send.result().cancel_goal_async()
    assert spin_until(rclpy_node, cancel.done, 10) and len(cancel.result().goals_canceling) == 1
    status, r = dropped.wait(timeout=30)
    assert status == CANCELED and r.finish_reason == "canceled", (status, r.finish_reason, r.error)
    assert 0 < len(r.token_ids) < MAX_TOKENS and list(r.token_ids) == reference[CASES[1]]["tokens"][:len(r.token_ids)]
    exact([kept])

    # -- The same with a UAV killed in the middle of the answers.
    goals = [Goal(rclpy_node, client, *case) for case in KILL_CASES]
    assert spin_until(rclpy_node, lambda: len(goals[0].feedback) >= 4, 120), control.output()
    pid = int(re.search(r"/uav2/shard_executor \(pid (\d+)\)", uavs["uav2"].output())[1])
    os.kill(pid, signal.SIGKILL)  # a process this test started (through its launcher)
    results = exact(goals)
    assert "uav2" not in latest["a"].ring
    # All three were in flight at the kill: each failed over at its own resume point.
    stats = [json.loads(r.stats_json) for r in results]
    assert [s["peak_running"] for s in stats] == [3, 3, 3], stats
    kills = [[i for i in s["incidents"] if i["uav"] == "uav2"] for s in stats]
    assert all(len(k) == 1 and k[0]["mode"] == "failover" and k[0]["resume_position"] > 0 for k in kills), \
        [(i["mode"], i["resume_position"], i["replay_from"], i["why"]) for k in kills for i in k]
