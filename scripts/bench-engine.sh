#!/usr/bin/env bash
# Engine benchmark (`make bench-engine`, after `source scripts/env.sh`).
#
# For each variant (fp32, q4, q4-fast, q4-fast grouped 10 layers per file) and, in the same
# invocation, llama.cpp on the original Q4_1 GGUF, all at ONE thread and the same prompt:
# decode tokens/s, ms per token (and per layer for the engine), peak RSS, load time; then a
# table with ratios vs llama.cpp. Both sides decode greedily exactly BENCH_TOKENS tokens (EOS
# ignored) after a one-chunk prefill of the same chat prompt; tokens/s counts the steps after the
# first token. Each configuration runs BENCH_REPEATS times, interleaved, and the best run counts
# (this machine is shared: noise only ever slows a run down).
#
# llama.cpp comes from PyPI `llama-cpp-python` (pinned below). If the venv lacks it, THIS script
# builds it into the venv (~10 min on 2 cores, once). CI never runs this script.
#
# Then, for the variants in BENCH_CONTEXT_VARIANTS and llama.cpp: decode time per token at 64,
# 512, 2,048 and 4,096 tokens of context (examples/decode_context.rs; llama.cpp after a prefill of
# as many tokens), as a table and target/bench-engine/context.png, with the time to stream the KV
# bytes once beside it; and the prefill of one ~1,024-token prompt (the engine in its 128-token
# chunks, llama.cpp in one batch of the same ids).
#
# Env: AEROKV_BIN (default target/release/aerokv), AEROKV_MODELS, ORT_DYLIB_PATH, BENCH_TOKENS (64),
#      BENCH_REPEATS (3), BENCH_VARIANTS ("fp32 q4 q4-fast q4-fast-g10"), BENCH_SKIP_LLAMA=1,
#      BENCH_CONTEXT_VARIANTS ("q4 q4-fast"), BENCH_CONTEXTS ("64,512,2048,4096"), BENCH_CONTEXT_STEPS (32).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${AEROKV_BIN:-$ROOT/target/release/aerokv}"
MODELS="${AEROKV_MODELS:-$ROOT/models/generated}"
VENV="${VIRTUAL_ENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$VENV/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1}"
TOKENS="${BENCH_TOKENS:-64}"
REPEATS="${BENCH_REPEATS:-3}"
VARIANTS="${BENCH_VARIANTS:-fp32 q4 q4-fast q4-fast-g10}"
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
GGUF="$MODELS/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT="Write a detailed story about a swarm of drones that explores a mountain valley."
CONTEXT_BIN="$ROOT/target/release/examples/decode_context"
CONTEXT_VARIANTS="${BENCH_CONTEXT_VARIANTS:-q4 q4-fast}"
CONTEXTS="${BENCH_CONTEXTS:-64,512,2048,4096}"
CONTEXT_STEPS="${BENCH_CONTEXT_STEPS:-32}"
# ~1,024 tokens once chat-formatted (the engine reports the ids; llama.cpp evaluates the same ids)
LONG_SENTENCE="At dawn the survey drones left the camp, followed the river north, climbed to the ridge, mapped the glacier and the lake, and sent their pictures back over the radio before the wind rose."
LONG_PROMPT="$(for _ in $(seq 1 26); do printf '%s ' "$LONG_SENTENCE"; done)Summarise the day."
OUT="$ROOT/target/bench-engine"
mkdir -p "$OUT"

log() { echo "[bench-engine] $*" >&2; }
die() { echo "[bench-engine] error: $*" >&2; exit 1; }

[ -x "$BIN" ] || die "$BIN not built: run \`make build\` (or set AEROKV_BIN)"
[ -x "$CONTEXT_BIN" ] || die "$CONTEXT_BIN not built: cargo build --release -p aerokv-engine --example decode_context"
[ -x "$PY" ] || die "no Python venv at $VENV: run \`make setup\`"
[ -f "$ORT_DYLIB_PATH" ] || die "ONNX Runtime not found at $ORT_DYLIB_PATH: run \`make setup\`"

# Grouped variant: generated on demand through the converter's --group (models/setup.sh).
for v in $VARIANTS; do
  if [[ "$v" =~ ^(.+)-g([0-9]+)$ ]] && [ ! -f "$MODELS/$v/manifest.json" ]; then
    log "generating $v (${BASH_REMATCH[1]}, ${BASH_REMATCH[2]} layers per file)"
    AEROKV_MODELS="$MODELS" models/setup.sh --variants "${BASH_REMATCH[1]}" --group "${BASH_REMATCH[2]}" >&2
  fi
  [ -f "$MODELS/$v/manifest.json" ] || die "variant $v missing under $MODELS: run \`make setup\`"
done

if [ "${BENCH_SKIP_LLAMA:-0}" != 1 ]; then
  [ -f "$GGUF" ] || die "$GGUF missing: run \`make setup\`"
  if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    log "building $LLAMA_CPP_PYTHON into $VENV (once; ~10 min on 2 cores)"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
      "$PY" -m pip install --disable-pip-version-check --no-cache-dir "$LLAMA_CPP_PYTHON" >&2 \
      || die "building $LLAMA_CPP_PYTHON failed"
  fi
fi

run_engine() {  # variant repeat
  local file="$OUT/engine-$1-$2.json"
  "$BIN" generate --user "$PROMPT" --max-tokens "$TOKENS" --variant "$1" --models "$MODELS" \
    --threads 1 --json --ignore-eos > "$file" 2> "$OUT/engine-$1-$2.log" \
    || { cat "$OUT/engine-$1-$2.log" >&2; die "aerokv generate failed for $1"; }
}

run_llama() {  # repeat
  "$PY" - "$GGUF" "$PROMPT" "$TOKENS" > "$OUT/llama-$1.json" <<'PYEOF'
import sys, time, json
import numpy as np
gguf, user, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_threads=1, n_threads_batch=1, n_ctx=512, n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
chat = "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"
ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
import llama_cpp
def last_logits():  # llama-cpp-python 0.3.36 leaves Llama.scores at zero without logits_all
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
t1 = time.perf_counter()
llm.eval(ids)  # prefill in one batch
tok = int(np.argmax(last_logits()))
t2 = time.perf_counter()
tokens = [tok]
while len(tokens) < n:  # one token per step, greedy, EOS ignored
    llm.eval([tok])
    tok = int(np.argmax(last_logits()))
    tokens.append(tok)
t3 = time.perf_counter()
peak = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) * 1024
print(json.dumps({"prompt_ids": ids, "tokens": tokens, "load_s": load_s, "prefill_s": t2 - t1,
                  "decode_s": t3 - t2, "tokens_per_s": (len(tokens) - 1) / (t3 - t2),
                  "ms_per_token_per_layer": 0.0, "peak_rss_bytes": peak,
                  "text": llm.detokenize(tokens).decode("utf-8", "replace")}))
PYEOF
}

run_llama_context() {  # decode ms per token after CONTEXTS tokens of context, JSON lines
  "$PY" - "$GGUF" "$CONTEXTS" "$CONTEXT_STEPS" <<'PYEOF'
import sys, time, json
gguf, contexts, steps = sys.argv[1], [int(c) for c in sys.argv[2].split(",")], int(sys.argv[3])
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_threads=1, n_threads_batch=1, n_ctx=max(contexts) + steps + 8, n_batch=512, verbose=False)
base = llm.tokenize(b"The drones mapped the valley, the ridge, the lake and the river. " * 8, add_bos=False)
for c in contexts:
    llm.reset()
    llm.eval((base * (c // len(base) + 1))[:c])
    tok, times = base[0], []
    for _ in range(steps + 2):
        t = time.perf_counter()
        llm.eval([tok])
        times.append((time.perf_counter() - t) * 1e3)
    times = sorted(times[2:])
    print(json.dumps({"context": c, "steps": steps, "ms_per_token_p50": times[len(times) // 2]}), flush=True)
PYEOF
}

run_llama_prefill() {  # the engine's prompt ids (JSON file) in one batch
  "$PY" - "$GGUF" "$1" <<'PYEOF'
import sys, time, json
gguf, ids = sys.argv[1], json.load(open(sys.argv[2]))["prompt_ids"]
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_threads=1, n_threads_batch=1, n_ctx=len(ids) + 16, n_batch=512, verbose=False)
t = time.perf_counter()
llm.eval(ids)
print(json.dumps({"prompt_tokens": len(ids), "prefill_s": time.perf_counter() - t}))
PYEOF
}

log "prompt: $PROMPT"
log "$TOKENS tokens x $REPEATS repeats, 1 thread; variants: $VARIANTS"
for r in $(seq 1 "$REPEATS"); do
  for v in $VARIANTS; do run_engine "$v" "$r"; done
  if [ "${BENCH_SKIP_LLAMA:-0}" != 1 ]; then run_llama "$r"; fi
done

log "prefill of a ~1,024-token prompt x $REPEATS"
for r in $(seq 1 "$REPEATS"); do
  for v in $CONTEXT_VARIANTS; do
    "$BIN" generate --user "$LONG_PROMPT" --max-tokens 1 --variant "$v" --models "$MODELS" --threads 1 --json \
      > "$OUT/prefill-$v-$r.json" 2> "$OUT/prefill-$v-$r.log" || { cat "$OUT/prefill-$v-$r.log" >&2; die "prefill run failed for $v"; }
  done
  if [ "${BENCH_SKIP_LLAMA:-0}" != 1 ]; then
    first="$(set -- $CONTEXT_VARIANTS; echo "$1")"
    run_llama_prefill "$OUT/prefill-$first-$r.json" > "$OUT/prefill-llama-$r.json"
  fi
done

log "decode time per token against context ($CONTEXTS tokens; $CONTEXT_STEPS steps each)"
series=()
if [ "${BENCH_SKIP_LLAMA:-0}" != 1 ]; then
  run_llama_context > "$OUT/context-llama.jsonl"
  series=(--series "llama.cpp Q4_1=$OUT/context-llama.jsonl")
fi
"$CONTEXT_BIN" "$(echo $CONTEXT_VARIANTS | tr ' ' ',')" "$CONTEXTS" "$CONTEXT_STEPS" 1 --png "$OUT/context.png" "${series[@]}" \
  > "$OUT/context-engine.jsonl" 2> "$OUT/context-engine.log" || { cat "$OUT/context-engine.log" >&2; die "decode_context failed"; }

"$PY" - "$OUT" "$REPEATS" "$VARIANTS" "${BENCH_SKIP_LLAMA:-0}" "$CONTEXT_VARIANTS" <<'PYEOF'
import json, sys, os
out, repeats, variants, skip_llama = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4] == "1"
def best(prefix):
    runs = [json.load(open(os.path.join(out, f"{prefix}-{r}.json"))) for r in range(1, repeats + 1)]
    b = max(runs, key=lambda x: x["tokens_per_s"])
    b["all_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in runs]
    b["load_s"] = min(x["load_s"] for x in runs)
    b["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs)
    return b
rows = [(v, best(f"engine-{v}")) for v in variants]
llama = None if skip_llama else best("llama")
if llama:
    rows.append(("llama.cpp Q4_1", llama))
print()
print(f"{'configuration':<16} {'tok/s':>7} {'ms/token':>9} {'ms/tok/layer':>12} {'peak RSS MB':>11} {'load s':>7} {'vs llama.cpp':>12}   runs (tok/s)")
for name, r in rows:
    ratio = f"{r['tokens_per_s'] / llama['tokens_per_s']:.2f}x" if llama else "-"
    per_layer = f"{r['ms_per_token_per_layer']:.3f}" if r["ms_per_token_per_layer"] else "-"
    print(f"{name:<16} {r['tokens_per_s']:>7.1f} {1000 / r['tokens_per_s']:>9.2f} {per_layer:>12} "
          f"{r['peak_rss_bytes'] / 2**20:>11.0f} {r['load_s']:>7.2f} {ratio:>12}   {r['all_tokens_per_s']}")
if llama:
    print()
    targets = {"q4": 0.8, "q4-fast": 1.0}
    for v, target in targets.items():
        match = [r for name, r in rows if name == v]
        if match:
            ratio = match[0]["tokens_per_s"] / llama["tokens_per_s"]
            print(f"target {v} >= {target:.1f}x llama.cpp: {ratio:.2f}x {'met' if ratio >= target else 'NOT met'}")
    q4 = dict(rows).get("q4")
    if q4:
        print(f"q4 vs llama.cpp greedy tokens: first {next((i for i, (a, b) in enumerate(zip(q4['tokens'], llama['tokens'])) if a != b), len(q4['tokens']))} equal"
              f" (llama.cpp rounds activations to 8 bits on Q4_1, so they drift apart; llama.cpp on float weights agrees)")
summary = {name: {k: r[k] for k in ("tokens_per_s", "ms_per_token_per_layer", "peak_rss_bytes", "load_s", "all_tokens_per_s")} for name, r in rows}

# Prefill of the ~1,024-token prompt: best of the repeats.
ctx_variants = sys.argv[5].split()
def best_prefill(prefix):
    return min(json.load(open(os.path.join(out, f"{prefix}-{r}.json")))["prefill_s"] for r in range(1, repeats + 1))
print()
prefill = {v: best_prefill(f"prefill-{v}") for v in ctx_variants}
n_prompt = len(json.load(open(os.path.join(out, f"prefill-{ctx_variants[0]}-1.json")))["prompt_ids"])
llama_prefill = None if skip_llama else best_prefill("prefill-llama")
for v, t in prefill.items():
    vs = f", llama.cpp {llama_prefill:.2f} s: {llama_prefill / t:.2f}x its speed" if llama_prefill else ""
    print(f"prefill of a {n_prompt}-token prompt, {v}: {t:.2f} s ({n_prompt / t:.0f} tokens/s){vs}")
if llama_prefill:
    print(f"prefill of a {n_prompt}-token prompt, llama.cpp: {llama_prefill:.2f} s ({n_prompt / llama_prefill:.0f} tokens/s)")
summary["prefill"] = {"prompt_tokens": n_prompt, "engine_s": prefill, "llama_cpp_s": llama_prefill}

# Decode time per token against the context.
ctx = [json.loads(l) for l in open(os.path.join(out, "context-engine.jsonl")) if l.strip()]
llama_ctx = {} if skip_llama else {d["context"]: d for d in map(json.loads, filter(str.strip, open(os.path.join(out, "context-llama.jsonl"))))}
contexts = sorted({d["context"] for d in ctx})
print()
head = f"{'context':>8} " + " ".join(f"{v + ' ms/tok':>16} {'(on CPU)':>9}" for v in ctx_variants)
print(head + f" {'KV MB':>7} {'stream KV ms':>12}" + (f" {'llama.cpp ms/tok':>17}" if llama_ctx else ""))
for c in contexts:
    cells = []
    for v in ctx_variants:
        d = next(d for d in ctx if d["variant"] == v and d["context"] == c)
        cells.append(f"{d['ms_per_token_p50']:>16.2f} {d['cpu_ms_per_token_p50']:>9.2f}")
    d0 = next(d for d in ctx if d["context"] == c)
    line = f"{c:>8} " + " ".join(cells) + f" {d0['kv_bytes'] / 1e6:>7.1f} {d0['kv_stream_ms']:>12.2f}"
    if llama_ctx:
        line += f" {llama_ctx[c]['ms_per_token_p50']:>17.2f}" if c in llama_ctx else f" {'-':>17}"
    print(line)
if 64 in contexts and 2048 in contexts:
    for v in ctx_variants:
        a = next(d for d in ctx if d["variant"] == v and d["context"] == 64)
        b = next(d for d in ctx if d["variant"] == v and d["context"] == 2048)
        r, rc = b["ms_per_token_p50"] / a["ms_per_token_p50"], b["cpu_ms_per_token_p50"] / a["cpu_ms_per_token_p50"]
        grew = b["cpu_ms_per_token_p50"] - a["cpu_ms_per_token_p50"]
        print(f"target {v}: time per token at 2,048 <= 1.3x at 64: {r:.2f}x wall, {rc:.2f}x on CPU {'met' if r <= 1.3 else 'NOT met'}"
              f" (+{grew:.2f} ms on CPU; streaming its {b['kv_bytes'] / 1e6:.0f} MB of KV once takes {b['kv_stream_ms']:.2f} ms)")
    if 64 in llama_ctx and 2048 in llama_ctx:
        print(f"llama.cpp (F16 KV): {llama_ctx[2048]['ms_per_token_p50'] / llama_ctx[64]['ms_per_token_p50']:.2f}x")
summary["context"] = {"engine": ctx, "llama_cpp": list(llama_ctx.values())}
print(f"(plot: {out}/context.png)")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"\n(details: {out}/summary.json and the per-run JSON files)")
PYEOF
