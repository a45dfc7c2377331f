#!/usr/bin/env python3
"""Run a converted variant with onnxruntime in Python, part by part, as the engine does:
embed -> every layer file (with its per-layer KV cache) -> head, one token at a time after
the prompt. Used by models/check.py and test/test_model_setup.py.

    python models/ort_runner.py --variant q4 --user "What is the capital of France?" --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODELS = os.environ.get("AEROKV_MODELS", os.path.join(HERE, "generated"))


class OrtModel:
    def __init__(self, variant_dir: str, threads: int = 1, opt_level: str = "all"):
        import onnxruntime as ort
        self.dir = variant_dir
        with open(os.path.join(variant_dir, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.arch = self.manifest["architecture"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[opt_level]
        self.parts = []
        files = self.manifest["files"]

        def sess(name):
            return ort.InferenceSession(os.path.join(variant_dir, name), so, providers=["CPUExecutionProvider"])
        self.embed = sess(next(e["name"] for e in files if e["kind"] == "embed"))
        self.head = sess(next(e["name"] for e in files if e["kind"] == "head"))
        self.layers = [(e["start"], e["end"], sess(e["name"]))
                       for e in sorted((e for e in files if e["kind"] == "layers"), key=lambda e: e["start"])]
        self.reset()

    def reset(self, capacity: int = 512):
        """Empty KV caches of `capacity` rows per layer (docs/model-format.md: the engine binds one
        buffer as past and present; here each run returns a new present, which becomes the past)."""
        kv, hd = self.arch["kv_heads"], self.arch["head_dim"]
        z = np.zeros((1, kv, capacity, hd), np.float32)
        self.past = {i: (z, z) for i in range(self.arch["layers"])}
        self.pos = 0
        self.rope_cos, self.rope_sin = rope_tables(self.arch, capacity)

    def forward(self, ids) -> np.ndarray:
        """Feed new token ids; returns logits [S, vocab] (float32)."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        S = ids.shape[1]
        total = self.pos + S
        if total > self.rope_cos.shape[0]:
            raise ValueError(f"{total} tokens exceed the cache capacity {self.rope_cos.shape[0]}")
        h = self.embed.run(None, {"input_ids": ids})[0]
        for s, e, sess in self.layers:
            feed = {"hidden": h, "seqlens_k": np.array([total - 1], np.int32),
                    "total_sequence_length": np.array(total, np.int32),
                    "rope_cos": self.rope_cos, "rope_sin": self.rope_sin}
            for i in range(s, e):
                feed[f"past_key_{i}"], feed[f"past_value_{i}"] = self.past[i]
            names = ["hidden_out"] + [f"present_{k}_{i}" for i in range(s, e) for k in ("key", "value")]
            out = sess.run(names, feed)
            h = out[0]
            for j, i in enumerate(range(s, e)):
                self.past[i] = (out[1 + 2 * j], out[2 + 2 * j])
        self.pos += S
        return self.head.run(None, {"hidden": h})[0][0]


def rope_tables(arch: dict, rows: int):
    """cos/sin of position x inv_freq for positions 0..rows-1: float64, rounded once to float32."""
    hd = arch["head_dim"]
    inv = arch["rope_base"] ** (-np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd)
    angle = np.arange(rows, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def greedy(model: OrtModel, prompt_ids, max_tokens: int, eos=None, one_by_one_prompt=False):
    """Greedy decoding. Returns (tokens, first_logits float32 [vocab], seconds_per_decode_step)."""
    model.reset()
    if eos is None:
        eos = model.manifest["tokens"]["eos"]
    if one_by_one_prompt:
        for t in prompt_ids:
            logits = model.forward([t])[-1]
    else:
        logits = model.forward(prompt_ids)[-1]
    first = logits.copy()
    tokens = []
    t0, steps = time.perf_counter(), 0
    while len(tokens) < max_tokens:
        nxt = int(np.argmax(logits))
        tokens.append(nxt)
        if nxt == eos or len(tokens) >= max_tokens:
            break
        logits = model.forward([nxt])[-1]
        steps += 1
    dt = (time.perf_counter() - t0) / max(steps, 1)
    return tokens, first, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--variant", default="q4")
    ap.add_argument("--user")
    ap.add_argument("--prompt-ids")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from tokenizers import Tokenizer
    d = os.path.join(a.models, a.variant)
    m = OrtModel(d, a.threads)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    if a.prompt_ids:
        ids = [int(x) for x in a.prompt_ids.split(",")]
    else:
        ids = tok.encode(m.manifest["chat_template"].replace("{user}", a.user or "Hello")).ids
    toks, first, dt = greedy(m, ids, a.max_tokens)
    print(json.dumps({"prompt_ids": ids, "tokens": toks, "text": tok.decode(toks),
                      "decode_tok_per_s": 1.0 / dt if dt else None}))


if __name__ == "__main__":
    main()
