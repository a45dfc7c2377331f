#!/usr/bin/env python3
"""Independent float64 numpy reference of SmolLM2-135M-Instruct, read from the GGUF directly.

It shares no code with models/convert.py and never loads the ONNX files:
- weights: gguf's own dequantizer (gguf.quants.dequantize), to float64;
- Q/K kept in llama.cpp's stored (permuted) row order, RoPE by rotating ADJACENT pairs
  (the ONNX graphs undo the permutation and rotate halves: two different routes);
- attention: explicit per-query-head loop over a float64 KV cache, query head h -> KV head h // 3;
- tokenizer: the `tokenizers` package on tokenizer.json (only to turn text into ids and back).

CLI (greedy decoding, stops at EOS or --max-tokens):
    python models/reference.py [--gguf PATH] (--user "QUESTION" | --prompt-ids 1,2,3)
        [--max-tokens 32] [--json] [--logits-out first_logits.npy] [--tokenizer tokenizer.json]
As a module:
    from reference import greedy
    out = greedy(prompt_ids, max_tokens=32)   # dict: tokens, first_logits (float64 ndarray), ...
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

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.environ.get("AEROKV_MODELS", os.path.join(HERE, "generated"))
DEFAULT_GGUF = os.path.join(MODELS, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class Reference:
    def __init__(self, path: str = DEFAULT_GGUF):
        import gguf
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: not found; run `make setup` (models/setup.sh fetches it)")
        r = gguf.GGUFReader(path)

        def meta(key):
            return r.fields[key].contents()
        self.n_layer = int(meta("llama.block_count"))
        self.n_embd = int(meta("llama.embedding_length"))
        self.n_head = int(meta("llama.attention.head_count"))
        self.n_head_kv = int(meta("llama.attention.head_count_kv"))
        self.head_dim = self.n_embd // self.n_head
        self.rope_base = float(meta("llama.rope.freq_base"))
        self.eps = float(meta("llama.attention.layer_norm_rms_epsilon"))
        self.eos = int(meta("tokenizer.ggml.eos_token_id"))
        self.w = {}
        for t in r.tensors:
            self.w[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
        self.vocab = self.w["token_embd.weight"].shape[0]
        # adjacent-pair RoPE frequencies
        self.inv_freq = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """x [S, n_heads, head_dim] in llama.cpp's row order: rotate (x[2i], x[2i+1])."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]  # [S, hd/2]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def new_cache(self):
        return [{"k": np.zeros((0, self.n_head_kv, self.head_dim)), "v": np.zeros((0, self.n_head_kv, self.head_dim))}
                for _ in range(self.n_layer)]

    def forward(self, ids, cache, pos0: int, last_only: bool = False):
        """ids: new tokens; cache: list of per-layer dicts, extended in place. Returns logits [S, vocab]
        ([1, vocab] for the last token only with `last_only`: a long prompt's LM head is most of its cost)."""
        ids = np.asarray(ids, dtype=np.int64)
        S, hd, nh, nkv = len(ids), self.head_dim, self.n_head, self.n_head_kv
        pos = np.arange(pos0, pos0 + S)
        x = self.w["token_embd.weight"][ids]  # [S, n_embd]
        for i in range(self.n_layer):
            b = f"blk.{i}."
            xn = self.rms(x, self.w[b + "attn_norm.weight"])
            q = (xn @ self.w[b + "attn_q.weight"].T).reshape(S, nh, hd)
            k = (xn @ self.w[b + "attn_k.weight"].T).reshape(S, nkv, hd)
            v = (xn @ self.w[b + "attn_v.weight"].T).reshape(S, nkv, hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            c = cache[i]
            c["k"] = np.concatenate([c["k"], k])
            c["v"] = np.concatenate([c["v"], v])
            T = c["k"].shape[0]
            # query j (absolute pos0 + j) sees keys 0 .. pos0 + j
            allowed = np.arange(T)[None, :] <= (pos0 + np.arange(S))[:, None]
            att = np.empty((S, nh, hd))
            for h in range(nh):
                kvh = h // (nh // nkv)
                sc = q[:, h, :] @ c["k"][:, kvh, :].T / np.sqrt(hd)  # [S, T]
                sc = np.where(allowed, sc, -np.inf)
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                sc /= sc.sum(axis=1, keepdims=True)
                att[:, h, :] = sc @ c["v"][:, kvh, :]
            x = x + att.reshape(S, nh * hd) @ self.w[b + "attn_output.weight"].T
            hn = self.rms(x, self.w[b + "ffn_norm.weight"])
            gate = hn @ self.w[b + "ffn_gate.weight"].T
            up = hn @ self.w[b + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w[b + "ffn_down.weight"].T
        if last_only:
            x = x[-1:]
        x = self.rms(x, self.w["output_norm.weight"])
        return x @ self.w["token_embd.weight"].T  # tied embeddings


_MODELS: dict = {}


def load(gguf_path: str = DEFAULT_GGUF) -> Reference:
    if gguf_path not in _MODELS:
        _MODELS[gguf_path] = Reference(gguf_path)
    return _MODELS[gguf_path]


def greedy(prompt_ids, max_tokens: int = 32, gguf_path: str = DEFAULT_GGUF, eos: int | None = None) -> dict:
    """Greedy decoding; the prompt is fed in one batch, then one token per step."""
    m = load(gguf_path)
    eos = m.eos if eos is None else eos
    cache = m.new_cache()
    t0 = time.perf_counter()
    logits = m.forward(prompt_ids, cache, 0, last_only=True)[-1]
    first = logits.copy()
    tokens = []
    pos = len(prompt_ids)
    while len(tokens) < max_tokens:
        nxt = int(np.argmax(logits))
        tokens.append(nxt)
        if nxt == eos or len(tokens) >= max_tokens:
            break
        logits = m.forward([nxt], cache, pos, last_only=True)[-1]
        pos += 1
    return {"prompt_ids": list(map(int, prompt_ids)), "tokens": tokens, "first_logits": first,
            "stopped_at_eos": bool(tokens and tokens[-1] == eos), "seconds": time.perf_counter() - t0}


def default_tokenizer_path() -> str:
    for v in ("q4", "fp32", "q4-fast", "tiny"):
        p = os.path.join(MODELS, v, "tokenizer.json")
        if os.path.isfile(p):
            return p
    return os.path.join(MODELS, "q4", "tokenizer.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--user", help="question, wrapped in the chat template")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--logits-out", help="write the first-step logits (float64 .npy) here instead of into the JSON")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the setup's)")
    a = ap.parse_args()
    from tokenizers import Tokenizer
    tpath = a.tokenizer or default_tokenizer_path()
    if not os.path.isfile(tpath):
        raise SystemExit(f"{tpath}: not found; run `make setup`")
    tok = Tokenizer.from_file(tpath)
    ids = [int(x) for x in a.prompt_ids.split(",")] if a.prompt_ids else tok.encode(CHAT.replace("{user}", a.user)).ids
    out = greedy(ids, a.max_tokens, a.gguf)
    out["text"] = tok.decode(out["tokens"])
    if a.logits_out:
        np.save(a.logits_out, out["first_logits"])
        out["first_logits"] = a.logits_out
    else:
        out["first_logits"] = out["first_logits"].tolist()
    if a.json:
        print(json.dumps(out))
    else:
        print(f"prompt ids ({len(ids)}): {ids}")
        print(f"tokens ({len(out['tokens'])}): {out['tokens']}")
        print(f"text: {out['text']!r}")
        print(f"{out['seconds']:.1f} s")


if __name__ == "__main__":
    main()
