#!/usr/bin/env python3
"""Cross-check the ONNX parts (onnxruntime, part by part, with KV caches) against the
independent float64 reference (models/reference.py), and time the parts.

    python models/check.py [--variants fp32,q4,q4-fast] [--max-tokens 32] [--bench-steps 64]

For each prompt: the reference decodes greedily (EOS ignored, so always --max-tokens tokens);
ORT decodes greedily on its own; the token lists must be equal. Logits are compared step by
step on the reference's tokens (teacher forcing): max |ORT - reference| over the vocab, for the
first step (prompt in one batch) and for every step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One BLAS thread: float64 matvecs are memory-bound, and OpenBLAS's spinning threads are ~8x
# slower than one thread on a shared, loaded 2-core machine (measured 12.4 s vs 1.6 s).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402
from ort_runner import DEFAULT_MODELS, OrtModel, greedy as ort_greedy  # noqa: E402

PROMPTS = ["What is the capital of France?", "Explain in two sentences why the sky is blue."]


def ref_logits_along(ref, ids, tokens):
    cache = ref.new_cache()
    out = [ref.forward(ids, cache, 0)[-1]]
    pos = len(ids)
    for t in tokens[:-1]:
        out.append(ref.forward([t], cache, pos)[-1])
        pos += 1
    return np.array(out)


def ort_logits_along(m, ids, tokens):
    m.reset()
    out = [m.forward(ids)[-1]]
    for t in tokens[:-1]:
        out.append(m.forward([t])[-1])
    return np.array(out, dtype=np.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--variants", default="fp32,q4,q4-fast")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--bench-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(a.models, "q4", "tokenizer.json"))
    ref = reference.load(os.path.join(a.models, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    prompts = [tok.encode(reference.CHAT.replace("{user}", p)).ids for p in PROMPTS]
    refs = []
    for p, ids in zip(PROMPTS, prompts):
        r = reference.greedy(ids, a.max_tokens, eos=-1, gguf_path=ref_path(a))
        r["all_logits"] = ref_logits_along(ref, ids, r["tokens"])
        refs.append(r)
        print(f"reference {p!r}: {len(ids)} prompt ids, {r['seconds']:.1f} s -> {tok.decode(r['tokens'])!r}")
    report = {}
    for v in a.variants.split(","):
        d = os.path.join(a.models, v)
        t0 = time.perf_counter()
        m = OrtModel(d, a.threads)
        load_s = time.perf_counter() - t0
        rows = []
        for p, ids, r in zip(PROMPTS, prompts, refs):
            toks, first, _ = ort_greedy(m, ids, a.max_tokens, eos=-1)
            lo = ort_logits_along(m, ids, r["tokens"])
            diff = np.abs(lo - r["all_logits"]).max(axis=1)
            same = toks == r["tokens"]
            first_div = next((i for i, (x, y) in enumerate(zip(toks, r["tokens"])) if x != y), None)
            # the prompt fed one token at a time must give the same tokens
            toks1, _, _ = ort_greedy(m, ids, a.max_tokens, eos=-1, one_by_one_prompt=True)
            rows.append({"prompt": p, "same_tokens": same, "first_divergence": first_div,
                         "same_tokens_prompt_one_by_one": toks1 == toks,
                         "first_logits_max_abs_diff": float(diff[0]),
                         "all_steps_max_abs_diff": float(diff.max()),
                         "argmax_agree_teacher_forced": int(sum(int(np.argmax(lo[i])) == r["tokens"][i]
                                                                for i in range(len(lo)))),
                         "ref_logit_range": float(np.abs(r["all_logits"]).max())})
            print(f"{v:8s} {p[:30]!r:34s} same 32 tokens: {same} (first divergence {first_div}); "
                  f"one-by-one prompt same: {toks1 == toks}; max|dlogit| first {diff[0]:.2e}, "
                  f"all steps {diff.max():.2e}", flush=True)
        # speed: prompt 1, then bench-steps decode steps, 1 intra-op thread
        m.reset()
        m.forward(prompts[0])
        nxt = refs[0]["tokens"][0]
        for _ in range(3):  # warm-up
            m.forward([nxt])
        t0 = time.perf_counter()
        for _ in range(a.bench_steps):
            m.forward([nxt])
        dt = (time.perf_counter() - t0) / a.bench_steps
        size = sum(e["bytes"] for e in m.manifest["files"])
        print(f"{v:8s} decode {1 / dt:.1f} tok/s ({dt * 1e3:.1f} ms/token at context {m.pos}, {a.threads} thread), "
              f"session load {load_s:.1f} s, {size / 1e6:.0f} MB", flush=True)
        report[v] = {"rows": rows, "decode_tok_per_s": 1 / dt, "load_s": load_s, "bytes": size}
    print(json.dumps(report, indent=1))


def ref_path(a):
    return os.path.join(a.models, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


if __name__ == "__main__":
    main()
