#!/usr/bin/env python3
"""Swarm benchmarks (run by `make bench-swarm` / `make bench-recovery` inside `unshare -n`).

  swarm     tokens/s of a 4-UAV swarm vs `aerokv generate` (same variant, same prompt, same
            invocation) as a ratio; per-hop activation latency p50/p99 from the executors' logs;
            what the pipeline's rhythm alone costs (one process idling like a 4-stage pipeline,
            examples/pipeline_rhythm.rs), to tell it from what the data plane costs.
  recovery  N runs with a random kill (random UAV, random token) -> completed, identical to the
            failure-free answer, detection / recovery / failure-to-next-token p50 and p95; and, at
            256 and 1024 tokens of context, a failover against an exact restart (two UAVs killed
            at once: the second fails during the first's recovery), failure to next token; and
            M runs with a standby scheduler whose primary is killed at a random token: identical,
            kill -> takeover, kill -> next token (the standby's), kill -> next token at the client
            (it resumes its goal by request id from the standby).
Figures are printed, never asserted: speed is not a test.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AEROKV = os.environ.get("AEROKV_BIN", str(ROOT / "target/release/aerokv"))
RHYTHM = ROOT / "target/release/examples/pipeline_rhythm"
PROMPT = "Write a detailed story about a swarm of drones that explores a mountain valley."


def generate(tokens, prompt=PROMPT):
    out = subprocess.run([AEROKV, "generate", "--user", prompt, "--max-tokens", str(tokens), "--ignore-eos", "--json"],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)


def swarm(tokens, *extra, log_dir=None):
    log_dir = log_dir or tempfile.mkdtemp(prefix="aerokv-bench-")
    cmd = [AEROKV, "swarm", "--uavs", "4", "--user", PROMPT, "--max-tokens", str(tokens), "--ignore-eos", "--json",
           "--log-dir", str(log_dir), *map(str, extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"_failed": out.stderr[-2000:] or f"exit code {out.returncode}", "log_dir": str(log_dir)}
    d = json.loads(out.stdout)
    d["log_dir"] = str(log_dir)
    return d


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, round((len(s) - 1) * q))] if s else float("nan")


def hop_latencies(log_dir):
    """Per executor, from its "activation hop latency" line: hops, p50 and p99 ms, ms per layer per
    decode step, preemptions per decode step."""
    out = {}
    for log in sorted(Path(log_dir).glob("uav*_shard_executor.log")):
        m = re.search(r"activation hop latency hops=(\d+) p50_ms=([\d.]+) p99_ms=([\d.]+) ms_per_layer_token=([\d.]+)"
                      r"(?: preempted_per_step=([\d.]+))?", log.read_text(errors="replace"))
        if m:
            out[log.name.split("_")[0]] = (int(m[1]), float(m[2]), float(m[3]), float(m[4]), float(m[5] or "nan"))
    return out


def bench_swarm(args):
    best_single, best_swarm, last, paired = 0.0, 0.0, None, []
    for i in range(args.repeats):
        # Alternate which of the pair runs first, so that neither always gets the later moment.
        if i % 2 == 0:
            single, s = generate(args.tokens), swarm(args.tokens)
        else:
            s, single = swarm(args.tokens), generate(args.tokens)
        if "_failed" in s:
            sys.exit(f"swarm failed: {s['_failed']}")
        assert s["tokens"] == single["tokens"], "the swarm's answer differs from one process"
        best_single, best_swarm, last = max(best_single, single["tokens_per_s"]), max(best_swarm, s["tokens_per_s"]), s
        paired.append(s["tokens_per_s"] / single["tokens_per_s"])
        print(f"run {i + 1}: one process {single['tokens_per_s']:.1f} tokens/s, swarm {s['tokens_per_s']:.1f} tokens/s, "
              f"ratio {paired[-1]:.2f}", flush=True)
    print(f"\n== bench-swarm: 4 UAVs, q4, {args.tokens} tokens, best of {args.repeats} (identical answers)")
    print(f"one process (aerokv generate): {best_single:8.1f} tokens/s")
    print(f"4-UAV swarm (aerokv swarm):    {best_swarm:8.1f} tokens/s")
    print(f"ratio swarm / one process:     {best_swarm / best_single:8.2f}   (best against best; target >= 0.90)")
    # This machine's speed drifts by +-10 % within a minute; a pair run back to back shares it.
    print(f"median of the paired ratios:   {statistics.median(paired):8.2f}   (each run against the one run next to it, order alternating)")
    layout = " ".join(f"{x['uav']}:{x['layers']}" for x in last["stats"]["layout"])
    print(f"layout (layers per UAV): {layout}")
    print("per-hop activation latency (sender stamp -> receipt), ms:")
    hops = hop_latencies(last["log_dir"])
    for uav, (n, p50, p99, *_) in hops.items():
        print(f"  into {uav}:   p50 {p50:6.3f}  p99 {p99:6.3f}  ({n} hops)")
    g = last["stats"].get("gateway_hop_ms", {})
    print(f"  into gateway: p50 {g.get('p50', float('nan')):6.3f}  p99 {g.get('p99', float('nan')):6.3f}  ({g.get('n', 0)} hops)")
    st = last["stats"].get("steps")
    if st:
        slowest = ", ".join(f"{x['round_trip_ms']:.1f} ms at {x['position']}" for x in st["slowest"])
        print(f"per decode step: swarm round trip (every stage and hop) p50 {st['round_trip_ms']['p50']:.2f} ms, "
              f"mean {st['round_trip_ms']['mean']:.2f} ms; gateway (LM head, sampling, embedding) mean {st['gateway_ms']['mean']:.2f} ms")
        print(f"slowest round trips: {slowest}  (boundary snapshots are due every t = "
              f"{'/'.join(sorted({str(x['t']) for x in last['stats']['layout']}))} tokens)")
    per_layer = [x[3] for x in hops.values()]
    if per_layer:
        print(f"compute per layer per token in the swarm (decode steps, as one process): {min(per_layer):.3f}-{max(per_layer):.3f} ms "
              f"(one process: {single['ms_per_token_per_layer']:.3f} ms)")
        # Compute that loses its core to other threads (DDS listeners and events, heartbeats) runs slower.
        preempted = " ".join(f"{uav}:{x[4]:.1f}" for uav, x in hops.items())
        print(f"times a stage's compute lost its core, per decode step: {preempted} "
              f"(one process, per token: {single.get('preempted_per_token', float('nan')):.2f})")
    # A pipeline's units each idle while the others compute; on a shared machine that alone makes
    # the compute slower. One process with the same rhythm and no messages measures it.
    out = subprocess.run([str(RHYTHM), "q4", str(args.tokens), "4", "3"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(f"pipeline rhythm: not measured ({out.stderr.strip()[-300:]})")
        return
    r = json.loads(out.stdout)
    assert r["identical"], "the paced process's answer differs from the one run back to back"
    rhythm = r["ratio"]
    print(f"\none process with a {r['stages']}-stage pipeline's rhythm (each unit idle {min(r['idle_ms']):.1f}-{max(r['idle_ms']):.1f} ms "
          f"before its turn, not counted), median of {len(r['rhythm_tokens_per_s'])}: "
          f"{statistics.median(r['rhythm_tokens_per_s']):.1f} tokens/s against {statistics.median(r['back_to_back_tokens_per_s']):.1f} back to back")
    print(f"what the rhythm alone costs on this machine:  {rhythm:8.2f}x")
    print(f"what the data plane costs (median paired ratio / rhythm): {statistics.median(paired) / rhythm:8.2f}x")


CLIENT_PROMPTS = [PROMPT, "Explain how a relay drone keeps a team connected.",
                  "Describe a glacier valley as seen from above.", "List the parts of a quadcopter."]


def bench_concurrent(args):
    """1, 2 and 4 clients at once against one 4-UAV swarm (launch files, real DDS)."""
    import rclpy
    from aerokv.action import Generate
    from rclpy.action import ActionClient

    references = {p: generate(args.tokens, p)["tokens"] for p in CLIENT_PROMPTS}
    log_dir = Path(tempfile.mkdtemp(prefix="aerokv-bench-concurrent-"))
    procs = [subprocess.Popen([AEROKV, "launch", str(ROOT / "launch/control.launch.xml"), "expected_uavs:=4",
                               "--log-dir", str(log_dir / "control")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    procs += [subprocess.Popen([AEROKV, "launch", str(ROOT / "launch/uav.launch.xml"), f"uav_id:=uav{i}",
                                "--log-dir", str(log_dir / f"uav{i}")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
              for i in range(1, 5)]
    rclpy.init()
    node = rclpy.create_node("bench_concurrent")
    rows = []
    try:
        from aerokv.msg import Assignment
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
        plan = {}
        node.create_subscription(Assignment, "/aerokv/assignment", lambda m: plan.update(a=m), latched)
        client = ActionClient(node, Generate, "/aerokv/generate")
        if not client.wait_for_server(timeout_sec=120):
            sys.exit("bench concurrent: no /aerokv/generate server")
        spin = lambda pred, timeout: _spin_until(rclpy, node, pred, timeout)
        if not spin(lambda: "a" in plan and len(plan["a"].ring) == 4, 120):
            sys.exit("bench concurrent: no plan over 4 UAVs")
        # A first request warms the swarm (plan, sessions); not counted.
        _run_clients(client, spin, CLIENT_PROMPTS[:1], 8)
        for n in (1, 2, 4):
            prompts = CLIENT_PROMPTS[:n]
            wall, results = _run_clients(client, spin, prompts, args.tokens)
            for p, r in zip(prompts, results):
                assert list(r.token_ids) == references[p], f"{n} clients: an answer differs from one process"
            tokens = sum(len(r.token_ids) for r in results)
            stats = json.loads(results[0].stats_json or "{}")
            rows.append((n, tokens, wall, tokens / wall, stats.get("prediction"), results))
            print(f"{n} client(s): {tokens} tokens in {wall:.2f} s (prompt to last token, every client)", flush=True)
    finally:
        node.destroy_node()
        rclpy.shutdown()
        for p in procs:  # the processes this benchmark started
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    one = rows[0][3]
    print(f"\n== bench-swarm, concurrent clients: 4 UAVs, q4, {args.tokens} tokens each (identical answers)")
    print("clients  aggregate tokens/s  ratio vs 1   cost model, drones with a CPU each (tokens/s, ratio)")
    for n, _, _, rate, _, _ in rows:
        model = _model_aggregate(rows[0][4], n)
        model = f"{model[0]:8.1f}  {model[1]:5.2f}  ({model[2]})" if model else "n/a (no prediction in stats_json)"
        print(f"{n:7d}  {rate:18.1f}  {rate / one:10.2f}   {model}")
    peaks = ", ".join(f"{n}: {json.loads(results[0].stats_json or '{}').get('peak_running', '?')}"
                      for n, _, _, _, _, results in rows)
    print(f"(requests running at once, as the scheduler saw them: {peaks}; this machine: 2 shared cores for "
          "4 stages and the gateway, shared with other work while measured)")


def _model_aggregate(prediction, n):
    """The cost model's aggregate for `n` requests in flight on drones with a CPU each: one request
    takes `token_s` per token (every stage, hop and the gateway in turn); n interleaved requests
    keep n steps in the pipeline, bounded by its busiest stage, the channel's airtime per token
    and the gateway, whichever is slowest. Returns (tokens/s, ratio to one request, the bound) or None."""
    m = (prediction or {}).get("model") or {}
    token_s = m.get("token_s")
    if not token_s:
        return None
    bounds = {"busiest stage": m.get("busiest_stage_s", 0.0),
              "channel airtime": m.get("activation_airtime_s", 0.0) + m.get("snapshot_airtime_s", 0.0),
              "gateway": prediction.get("gateway_s", 0.0)}
    name, bottleneck = max(bounds.items(), key=lambda kv: kv[1])
    if bottleneck <= 0 or n / token_s <= 1.0 / bottleneck:
        return n / token_s, float(n), "pipeline round trip"
    return 1.0 / bottleneck, token_s / bottleneck, f"{name} {bottleneck * 1e3:.1f} ms/token"


def _spin_until(rclpy, node, pred, timeout):
    import time
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        rclpy.spin_once(node, timeout_sec=0.05)
    return True


def _run_clients(client, spin, prompts, tokens):
    """Sends one goal per prompt at once; returns the wall time until the last result and the results."""
    import time
    from aerokv.action import Generate

    started = time.monotonic()
    sends = [client.send_goal_async(Generate.Goal(user=p, max_tokens=tokens, ignore_eos=True)) for p in prompts]
    if not spin(lambda: all(s.done() for s in sends), 60):
        sys.exit("bench concurrent: goals not answered")
    results = [s.result().get_result_async() for s in sends]
    if not spin(lambda: all(r.done() for r in results), 900):
        sys.exit("bench concurrent: results did not come")
    wall = time.monotonic() - started
    out = [r.result().result for r in results]
    for r in out:
        if not r.accepted or r.finish_reason != "length":
            sys.exit(f"bench concurrent: a request ended {r.finish_reason}: {r.error}")
    return wall, out


def bench_recovery(args):
    rng = random.Random(args.seed)
    reference = generate(args.tokens)["tokens"]
    rows = []
    for i in range(args.runs):
        uav, token = f"uav{rng.randint(1, 4)}", rng.randint(4, args.tokens - 8)
        s = swarm(args.tokens, "--kill", f"{uav}:{token}")
        ok = "_failed" not in s
        same = ok and s["tokens"] == reference
        f = next((x for x in s.get("failures", []) if x["uav"] == uav), None) if ok else None
        rows.append({"uav": uav, "token": token, "completed": ok, "identical": same, "failure": f})
        desc = f"{f['mode']}: detect {f['detection_s']:.3f} s, recover {f['recovery_s']:.3f} s, next token {f['next_token_s']:.3f} s" if f else s.get("_failed", "no failure recorded")[-200:]
        print(f"run {i + 1:2d}: kill {uav} at token {token:3d} -> {'identical' if same else 'DIFFERENT' if ok else 'FAILED'}; {desc}", flush=True)
    fs = [r["failure"] for r in rows if r["failure"]]
    print(f"\n== bench-recovery: {args.runs} runs, 4 UAVs, {args.tokens} tokens, one random kill each (seed {args.seed})")
    print(f"completed: {sum(r['completed'] for r in rows)}/{args.runs}   identical to the failure-free answer: {sum(r['identical'] for r in rows)}/{args.runs}")
    print(f"modes: " + ", ".join(f"{m} {sum(1 for f in fs if f['mode'] == m)}" for m in sorted({f['mode'] for f in fs})))
    for key, label in [("detection_s", "detection"), ("recovery_s", "recovery"), ("next_token_s", "failure -> next token")]:
        v = [f[key] for f in fs if f.get(key) is not None]
        target = "   (target next token p50 < 0.5 s)" if key == "next_token_s" else ""
        print(f"{label:22s} p50 {pct(v, 0.5):6.3f} s   p95 {pct(v, 0.95):6.3f} s{target}")

    bench_scheduler_death(args, rng, reference)

    print("\n== failover vs an exact restart, same invocation")
    for ctx in args.contexts:
        # the prompt is ~25 tokens: kill once about `ctx` tokens of context are in the caches
        kill_at = ctx - 25
        s = swarm(min(ctx, 1024), "--kill", f"uav2:{kill_at}")
        # Two UAVs at once: the second fails during the first's recovery, so the scheduler
        # restarts the request exactly (the prompt and every token fed again, as first computed,
        # several steps in flight) on the two left.
        r = swarm(min(ctx, 1024), "--kill", f"uav2:{kill_at}", "--kill", f"uav3:{kill_at}")
        if "_failed" in s or "_failed" in r:
            print(f"context {ctx}: swarm failed: {(s.get('_failed') or r.get('_failed'))[-300:]}")
            continue
        f = next((x for x in s["failures"] if x["uav"] == "uav2"), None)
        # whichever of the two was declared first is the one whose recovery became the restart
        g = next((x for x in r["failures"] if x["mode"] == "restart"), None)
        if f and g:
            print(f"context {ctx:5d}: failover (failure -> next token) {f['next_token_s']:6.3f} s [{f['mode']}, "
                  f"tail inputs replayed from {f['replay_from']} of {f['resume_position']}]; "
                  f"restart {g['next_token_s']:6.2f} s [{g['mode']}]; failover is "
                  f"{g['next_token_s'] / f['next_token_s']:5.1f}x faster (target >= 5x at 1024)")
        else:
            print(f"context {ctx:5d}: no failover of uav2 and restart to compare: {s['failures']}, {r['failures']}")


def bench_scheduler_death(args, rng, reference):
    """The primary scheduler killed (SIGKILL) at a random token; the standby takes over."""
    if not args.scheduler_runs:
        return
    rows = []
    for i in range(args.scheduler_runs):
        token = rng.randint(4, args.tokens - 8)
        s = swarm(args.tokens, "--standby", "--kill", f"scheduler:{token}")
        ok = "_failed" not in s
        same = ok and s["tokens"] == reference
        f = next((x for x in s.get("failures", []) if x["uav"] == "scheduler"), None) if ok else None
        client = s.get("resumed_token_s") if ok else None
        rows.append({"completed": ok, "identical": same, "failure": f, "client": client})
        desc = (f"takeover {f['detection_s']:.3f} s, next token {f['next_token_s']:.3f} s, at the client {client or float('nan'):.3f} s"
                f" [{'on the KV from position ' + str(f['resume_position']) if f.get('resume_position') else 'fed again: ' + str(f.get('why', ''))[-120:]}]"
                if f else s.get("_failed", "no takeover recorded")[-300:])
        print(f"run {i + 1:2d}: kill the primary at token {token:3d} -> {'identical' if same else 'DIFFERENT' if ok else 'FAILED'}; {desc}", flush=True)
    fs = [r["failure"] for r in rows if r["failure"]]
    print(f"\n== bench-recovery, the scheduler's death: {args.scheduler_runs} runs, 4 UAVs + a standby, {args.tokens} tokens, "
          f"the primary killed at a random token")
    print(f"completed: {sum(r['completed'] for r in rows)}/{args.scheduler_runs}   identical to the failure-free answer: "
          f"{sum(r['identical'] for r in rows)}/{args.scheduler_runs}")
    for label, v in [("kill -> takeover", [f["detection_s"] for f in fs]),
                     ("kill -> next token", [f["next_token_s"] for f in fs if f["next_token_s"] == f["next_token_s"]]),
                     ("kill -> token at client", [r["client"] for r in rows if r["client"] is not None])]:
        target = "   (target < 2 s)" if label == "kill -> next token" else ""
        print(f"{label:24s} p50 {pct(v, 0.5):6.3f} s   p95 {pct(v, 0.95):6.3f} s   max {max(v, default=float('nan')):6.3f} s{target}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("swarm")
    a.add_argument("--tokens", type=int, default=128)
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--concurrent-tokens", type=int, default=64)
    c = sub.add_parser("concurrent")
    c.add_argument("--tokens", type=int, default=64)
    b = sub.add_parser("recovery")
    b.add_argument("--runs", type=int, default=20)
    b.add_argument("--tokens", type=int, default=64)
    b.add_argument("--seed", type=int, default=7)
    b.add_argument("--contexts", type=int, nargs="*", default=[256, 1024])
    b.add_argument("--scheduler-runs", type=int, default=10, help="runs that kill the primary scheduler (0: none)")
    args = ap.parse_args()
    {"swarm": bench_swarm, "recovery": bench_recovery, "concurrent": bench_concurrent}[args.cmd](args)
    if args.cmd == "swarm":
        # `make bench-swarm`: the concurrent clients too, in the same invocation.
        bench_concurrent(argparse.Namespace(tokens=args.concurrent_tokens))


if __name__ == "__main__":
    main()
