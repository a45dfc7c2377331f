#!/usr/bin/env python3
"""Thread wakeups of the AeroKV processes on this machine, per thread kind.

Run it while a swarm generates (e.g. `aerokv swarm --max-tokens 600 --ignore-eos` in another
shell): `python3 scripts/thread_wakeups.py [SECONDS]`. Prints, per process and thread name, the CPU
ticks used and the voluntary (woke up after sleeping) and involuntary (preempted, or yielded)
context switches per second, from /proc/*/task/*/status. On a 2-core machine every wakeup anywhere
can preempt the one drone that is computing; session 3 used this to find the 5 ms spin timeouts
and the port health check (docs/results.md). Reads /proc only; starts and stops nothing.
"""
import collections
import glob
import sys
import time

PROCESSES = ("shard_executor", "scheduler", "watchdog", "battery_monitor", "aerokv")


def snapshot():
    out = {}
    for stat in glob.glob("/proc/[0-9]*/task/*/stat"):
        parts = stat.split("/")
        pid, tid = parts[2], parts[4]
        try:
            text = open(stat).read()
            process = open(f"/proc/{pid}/comm").read().strip()
            status = open(f"/proc/{pid}/task/{tid}/status").read()
        except OSError:
            continue  # the thread ended meanwhile
        if process not in PROCESSES:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        switches = {k: int(v) for k, v in (line.split(":\t") for line in status.splitlines() if "ctxt_switches" in line)}
        out[(process, name, tid)] = (int(fields[11]) + int(fields[12]), switches["voluntary_ctxt_switches"],
                                     switches["nonvoluntary_ctxt_switches"])
    return out


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    before = snapshot()
    time.sleep(seconds)
    after = snapshot()
    groups = collections.defaultdict(lambda: [0, 0, 0, 0])
    for key, (ticks, vol, invol) in after.items():
        if key not in before:
            continue
        process, name, _ = key
        kind = "dds.shm.<port>" if name.startswith("dds.shm.") and name != "dds.shm.wdog" else name
        g = groups[(process, kind)]
        g[0] += ticks - before[key][0]
        g[1] += vol - before[key][1]
        g[2] += invol - before[key][2]
        g[3] += 1
    if not groups:
        sys.exit("no AeroKV process is running")
    print(f"{'process':16s} {'thread':18s} {'threads':>7s} {'cpu %':>6s} {'wakeups/s':>10s} {'preempted/s':>12s}")
    total = [0, 0]
    for (process, kind), (ticks, vol, invol, n) in sorted(groups.items(), key=lambda x: -x[1][1]):
        print(f"{process:16s} {kind:18s} {n:7d} {ticks / seconds:6.1f} {vol / seconds:10.0f} {invol / seconds:12.0f}")
        total[0] += vol
        total[1] += invol
    print(f"total: {total[0] / seconds:.0f} wakeups/s, {total[1] / seconds:.0f} involuntary switches/s")


if __name__ == "__main__":
    main()
