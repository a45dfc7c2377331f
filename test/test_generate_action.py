"""The `/aerokv/generate` action (docs/generate-api.md), from rclpy's own action client against a
real swarm (two UAVs, the q4 model, DDS over shared memory): goals queue and each gets its own
feedback, a full queue is refused with its reason, cancel stops a running goal (and the swarm then
serves the next one exactly) or takes a queued one off the queue, and a goal sent again with its
request id resumes the answer from the tokens the client already has.

The answers must equal `aerokv generate` (one process, the whole model). One swarm for all cases.
"""
import json
import math
import subprocess

import pytest
from conftest import BIN, launch_swarm, spin_until
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

PROMPTS = ["What is a drone?", "Name three uses of a swarm of drones."]
MAX_TOKENS = 24
# Long enough to be running when the next goals arrive.
LONG_TOKENS = 96
EVENTS = QoSProfile(depth=100, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
SUCCEEDED, CANCELED, ABORTED = 4, 5, 6  # action_msgs/GoalStatus


@pytest.fixture(scope="module")
def reference():
    """Greedy answers of the whole model in one process: (prompt, max_tokens) -> answer."""
    out = {}
    for prompt, n in [(PROMPTS[0], MAX_TOKENS), (PROMPTS[1], MAX_TOKENS), (PROMPTS[1], LONG_TOKENS)]:
        r = subprocess.run([BIN / "aerokv", "generate", "--user", prompt, "--max-tokens", str(n), "--json"],
                           capture_output=True, text=True, timeout=300, check=True)
        out[prompt, n] = json.loads(r.stdout)
    return out


class Goal:
    """One goal: its feedback (in arrival order) and, once done, its status and result."""

    def __init__(self, node, client, **fields):
        from aerokv.action import Generate

        self.node, self.feedback = node, []
        self.send = client.send_goal_async(Generate.Goal(**fields), feedback_callback=lambda m: self.feedback.append(m.feedback))
        self.result = None

    def handle(self):
        assert spin_until(self.node, self.send.done, timeout=30)
        h = self.send.result()
        assert h.accepted
        if not hasattr(self, "_result"):
            self._result = h.get_result_async()
        return h

    def wait(self, timeout=120):
        self.handle()
        assert spin_until(self.node, self._result.done, timeout=timeout)
        r = self._result.result()
        self.status, self.result = r.status, r.result
        return self.result

    def tokens(self):
        """The feedback's tokens, checked to be contiguous (no token twice, none missing)."""
        out = []
        for fb in self.feedback:
            assert fb.index == len(out) + self.first_index(), [(f.index, len(f.token_ids)) for f in self.feedback]
            out += list(fb.token_ids)
        return out

    def first_index(self):
        return self.feedback[0].index if self.feedback else 0


def test_goals_queue_cancel_and_resume_by_id(rclpy_node, procs, reference, tmp_path):
    from aerokv.msg import Assignment, TokenChunk
    from rclpy.action import ActionClient
    from aerokv.action import Generate

    # One request at a time, so that goals queue (several at once: test_concurrent.py).
    control, _ = launch_swarm(procs, tmp_path, ["uav1", "uav2"], max_queue=2, finished_kept=4, max_running=1)
    latest, chunks = {}, []
    rclpy_node.create_subscription(Assignment, "/aerokv/assignment", lambda m: latest.update(a=m), LATCHED)
    rclpy_node.create_subscription(TokenChunk, "/aerokv/tokens", chunks.append, EVENTS)
    assert spin_until(rclpy_node, lambda: "a" in latest and len(latest["a"].ring) == 2, 90), control.output()
    client = ActionClient(rclpy_node, Generate, "/aerokv/generate")
    assert client.wait_for_server(timeout_sec=30)
    goal = lambda **kw: Goal(rclpy_node, client, **kw)
    short = lambda prompt, **kw: goal(user=prompt, max_tokens=MAX_TOKENS, **kw)

    def exact(g, prompt, n=MAX_TOKENS):
        ref = reference[prompt, n]
        r = g.wait()
        assert g.status == SUCCEEDED and r.accepted and r.error == "", (g.status, r.error, control.output())
        assert list(r.token_ids) == ref["tokens"] and r.text == ref["text"] and list(r.prompt_ids) == ref["prompt_ids"]
        return r

    def fed(g, tokens, start):
        """g's feedback: the answer's tokens from `start` on, each once and in order. rclpy's action
        client drops a goal's feedback that it takes after the goal's result (it removes the
        callback), and result and feedback travel on different topics: the feedback may end early,
        the result carries the whole answer (checked by `exact`)."""
        spin_until(rclpy_node, lambda: len(g.tokens()) >= len(tokens) - start, 2)
        got = g.tokens()
        assert got and g.first_index() == start and got == tokens[start:start + len(got)], (start, len(got))

    def refused(g, *words):
        r = g.wait(timeout=30)
        assert g.status == ABORTED and not r.accepted and r.finish_reason == "refused", (g.status, r)
        assert all(w in r.error for w in words), r.error
        assert g.feedback == []

    # -- Two goals queued behind a running one; a third does not fit (max_queue 2).
    first = goal(user=PROMPTS[1], max_tokens=LONG_TOKENS)
    assert spin_until(rclpy_node, lambda: first.feedback, 60), control.output()
    a, b = short(PROMPTS[0]), short(PROMPTS[1])
    a.handle(), b.handle()
    refused(short(PROMPTS[0]), "queue is full", "max_queue")
    exact(first, PROMPTS[1], LONG_TOKENS), exact(a, PROMPTS[0]), exact(b, PROMPTS[1])
    # Each goal's feedback is its own answer, from token 0, and carries its request id.
    ids = [g.result.request_id for g in (first, a, b)]
    assert len(set(ids)) == 3
    for g in [first, a, b]:
        fed(g, list(g.result.token_ids), 0)
        assert g.result.text.startswith("".join(f.text for f in g.feedback))
        assert {f.request_id for f in g.feedback} == {g.result.request_id}
    # Served one at a time, in order: the token topic carries one request's tokens after the other.
    order = [c.request_id for c in chunks if c.request_id in ids]
    assert order == sorted(order, key=ids.index), order

    # -- Cancel of a queued goal: it ends canceled without a token; then of the running one.
    running = goal(user=PROMPTS[1], max_tokens=LONG_TOKENS)
    assert spin_until(rclpy_node, lambda: len(running.tokens()) >= 5, 60)
    waiting, next_one = short(PROMPTS[0]), short(PROMPTS[0])
    waiting.handle(), next_one.handle()
    cancel = waiting.handle().cancel_goal_async()
    assert spin_until(rclpy_node, cancel.done, 10) and len(cancel.result().goals_canceling) == 1
    r = waiting.wait(timeout=10)
    assert waiting.status == CANCELED and waiting.feedback == [] and r.finish_reason == "canceled"
    cancel = running.handle().cancel_goal_async()
    assert spin_until(rclpy_node, cancel.done, 10) and len(cancel.result().goals_canceling) == 1
    r = running.wait(timeout=10)
    assert running.status == CANCELED and r.finish_reason == "canceled"
    stopped = r.request_id
    assert 0 < len(r.token_ids) < LONG_TOKENS
    assert list(r.token_ids) == reference[PROMPTS[1], LONG_TOKENS]["tokens"][: len(r.token_ids)]
    # The swarm serves the next goal, exactly.
    exact(next_one, PROMPTS[0])
    # No step after the cancel: the canceled request's tokens on the topic are those of its result,
    # then its last chunk says "canceled".
    mine = [c for c in chunks if c.request_id == stopped]
    assert [c.token_id for c in mine if not c.done] == list(r.token_ids), (len(mine), len(r.token_ids))
    assert mine[-1].done and mine[-1].finish_reason == "canceled"
    assert all(c.request_id != waiting.result.request_id for c in chunks)

    # -- Resume by request id: a client lost its connection after 5 tokens and asks again.
    rid = 4242
    lost = goal(user=PROMPTS[1], max_tokens=LONG_TOKENS, request_id=rid)
    assert spin_until(rclpy_node, lambda: len(lost.tokens()) >= 5, 60)
    ref = reference[PROMPTS[1], LONG_TOKENS]["tokens"]
    again = goal(user=PROMPTS[1], max_tokens=LONG_TOKENS, request_id=rid, resume_from=5)
    r = exact(again, PROMPTS[1], LONG_TOKENS)
    assert r.request_id == rid
    fed(again, ref, 5)
    assert {f.request_id for f in again.feedback} == {rid}
    exact(lost, PROMPTS[1], LONG_TOKENS)
    # ... and once it has finished (kept in the finished table): the rest at once, then the result.
    late = goal(user=PROMPTS[1], max_tokens=LONG_TOKENS, request_id=rid, resume_from=40)
    exact(late, PROMPTS[1], LONG_TOKENS)
    fed(late, ref, 40)
    assert reference[PROMPTS[1], LONG_TOKENS]["text"].endswith("".join(f.text for f in late.feedback))
    # The swarm ran it once: its tokens went over the topic once each.
    assert [c.token_id for c in chunks if c.request_id == rid and not c.done] == ref

    # -- Every goal field is checked, with its reason; an id cannot be taken by another request.
    refused(goal(user=PROMPTS[1], max_tokens=MAX_TOKENS, request_id=rid), "request id 4242 belongs to another request")
    refused(goal(user=PROMPTS[0], max_tokens=MAX_TOKENS, request_id=777, resume_from=3), "nothing to resume")
    refused(goal(user=PROMPTS[1], max_tokens=LONG_TOKENS, request_id=rid, resume_from=LONG_TOKENS + 1), "beyond")
    refused(short(PROMPTS[0], temperature=math.nan), "temperature")
    refused(short(PROMPTS[0], top_p=1.5), "top_p")
    refused(goal(user=PROMPTS[0], max_tokens=0), "max_tokens must be within 1..=1024")
    refused(goal(user="drone " * 9000, max_tokens=8), "context limit of 8192")
    refused(goal(max_tokens=8), "empty request")
    # The service is a thin wrapper over the same queue.
    from aerokv.srv import Generate as GenerateSrv

    service = rclpy_node.create_client(GenerateSrv, "/aerokv/generate")
    assert service.wait_for_service(timeout_sec=10)
    call = service.call_async(GenerateSrv.Request(user=PROMPTS[0], max_tokens=MAX_TOKENS))
    assert spin_until(rclpy_node, call.done, 120)
    assert list(call.result().token_ids) == reference[PROMPTS[0], MAX_TOKENS]["tokens"]
    assert control.stop() == 0, control.output()
