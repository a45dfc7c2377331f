#!/usr/bin/env bash
# `make demo`: a 4-drone swarm on this machine answers a question; one drone is killed (SIGKILL)
# mid-answer; the swarm recovers and finishes. Then the same question is answered by the whole
# model in one process, and the two answers are compared token by token. The mission is recorded
# (a rosbag2 bag), its assignments audited, and its report written (figures and a summary).
# Runs inside `unshare -n` (no network traffic can leave), on a ROS domain of its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/env.sh
QUESTION="${DEMO_QUESTION:-Why would a swarm of drones share one language model?}"
TOKENS="${DEMO_TOKENS:-96}"
KILL="${DEMO_KILL:-uav2:32}"
OUT="$ROOT/target/demo"
mkdir -p "$OUT"
rm -rf "$OUT/mission" "$OUT/report"   # a bag goes into a new directory
export ROS_DOMAIN_ID="${DEMO_DOMAIN_ID:-$((100 + $$ % 100))}"

echo "== AeroKV demo: 4 UAVs (uav3 starts at 60% battery), ${TOKENS} tokens, SIGKILL ${KILL%%:*}'s executor after ${KILL##*:} tokens"
echo "   node logs: $OUT/nodes"
echo
echo "Q: $QUESTION"
printf "A: "
unshare -n -- bash -c 'ip link set lo up; exec "$@"' demo \
  target/release/aerokv swarm --uavs 4 --soc uav3=0.6 --user "$QUESTION" --max-tokens "$TOKENS" \
  --kill "$KILL" --log-dir "$OUT/nodes" --report "$OUT/swarm.json" --record "$OUT/mission"
echo
target/release/aerokv generate --user "$QUESTION" --max-tokens "$TOKENS" --json > "$OUT/single.json" 2>/dev/null
status=0
python3 - "$OUT/swarm.json" "$OUT/single.json" <<'PY' || status=$?
import json, sys
swarm, single = (json.load(open(p)) for p in sys.argv[1:3])
print("== What happened")
for s in swarm["stats"]["layout"]:
    print(f"   final layout: {s['uav']} layers {s['start']}..{s['start'] + s['layers'] - 1} (K={s['k']} replicated on its predecessor, snapshot every T={s['t']} tokens)")
for f in swarm["failures"]:
    print(f"   {f['uav']} killed after {f['token']} tokens: detected in {f['detection_s']:.2f} s, recovered by {f['mode']} "
          f"in {f['recovery_s']:.2f} s, next token {f['next_token_s']:.2f} s after the kill")
same = swarm["tokens"] == single["tokens"]
print(f"   swarm: {len(swarm['tokens'])} tokens at {swarm['tokens_per_s']:.1f} tokens/s; one process: {single['tokens_per_s']:.1f} tokens/s")
print(f"   identical to the run without a failure (one process, same model): {'yes' if same else 'NO'}")
sys.exit(0 if same and swarm["failures"] else 1)
PY
echo "== The mission on record"
echo "   bag:    $OUT/mission (aerokv bag info | play | audit)"
RUST_LOG=warn target/release/aerokv bag audit "$OUT/mission" | tail -n 1 | sed 's/^/   /' || status=1
target/release/aerokv report "$OUT/mission" --out "$OUT/report" > /dev/null || status=1
echo "   report: $OUT/report/summary.md (figures: $OUT/report/*.png)"
exit "$status"
