#!/usr/bin/env python3
"""GGUF (SmolLM2-135M-Instruct, Q4_1) -> ONNX model parts, per docs/model-format.md.

numpy + onnx only (no torch). One variant per run:

    python models/convert.py --gguf models/generated/gguf/SmolLM2-135M-Instruct.Q4_1.gguf \
        --variant q4 --out models/generated/q4 [--group N]

Variants: fp32 (dequantized weights, float32 MatMul), q4 (MatMulNBits 4-bit exact to Q4_1),
q4-fast (same, accuracy_level 4 = 8-bit activations), tiny (random weights, small config,
same graph builder, real tokenizer; for fast unit tests only).

The output is written to `<out>.tmp` and renamed into place when complete, so an interrupted
conversion never leaves a directory that looks valid.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Bump when the graphs or the manifest change: models/setup.sh regenerates variants whose
# manifest carries another converter version.
CONVERTER_VERSION = 5
FORMAT = 2
OPSET = 17
IR_VERSION = 10  # ORT 1.31 accepts <= 13; onnx 1.23 would write 14
MODEL_NAME = "SmolLM2-135M-Instruct"
CHAT_TEMPLATE = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
VARIANTS = ("fp32", "q4", "q4-fast", "tiny")
QK = 32  # GGUF block size for Q4_1 and Q8_0


def log(msg: str) -> None:
    print(f"[convert] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Weights in memory
# --------------------------------------------------------------------------------------------
@dataclass
class Q4:
    """Q4_1 weight W[N, K] (y = x @ W.T): w = d * q + m per block of 32 along K."""
    q: np.ndarray  # uint8 [N, K/32, 32], values 0..15
    d: np.ndarray  # float32 [N, K/32] (exact fp16 values)
    m: np.ndarray  # float32 [N, K/32]

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def k(self) -> int:
        return self.q.shape[1] * QK

    def dequant(self) -> np.ndarray:
        w = self.q.astype(np.float32) * self.d[:, :, None] + self.m[:, :, None]
        return w.reshape(self.n, self.k)

    def rows(self, idx) -> "Q4":
        return Q4(self.q[idx], self.d[idx], self.m[idx])

    def scaled(self, s: float) -> "Q4":  # s must be a power of two to stay exact
        return Q4(self.q, self.d * np.float32(s), self.m * np.float32(s))

    @staticmethod
    def cat(parts) -> "Q4":
        return Q4(np.concatenate([p.q for p in parts]), np.concatenate([p.d for p in parts]),
                  np.concatenate([p.m for p in parts]))


@dataclass
class Q8:
    """Q8_0 weight W[N, K]: w = d * q per block of 32, q int8."""
    q: np.ndarray  # int8 [N, K/32, 32]
    d: np.ndarray  # float32 [N, K/32]

    def dequant(self) -> np.ndarray:
        n, nb, _ = self.q.shape
        return (self.q.astype(np.float32) * self.d[:, :, None]).reshape(n, nb * QK)


def parse_q4_1(raw: np.ndarray) -> Q4:
    raw = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, 20)
    d = raw[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = raw[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    qs = raw[:, :, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.uint8)
    return Q4(q, d, m)


def parse_q8_0(raw: np.ndarray) -> Q8:
    raw = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, 34)
    d = raw[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    q = raw[:, :, 2:34].copy().view(np.int8)
    return Q8(q, d)


@dataclass
class Config:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_base: float
    rms_eps: float
    max_context: int

    def as_json(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate": self.intermediate, "vocab": self.vocab,
                "rope_base": self.rope_base, "rms_eps": self.rms_eps,
                "max_context": self.max_context}


@dataclass
class LayerW:
    attn_norm: np.ndarray
    q: Q4  # rows in HF order (llama.cpp's RoPE permutation undone)
    k: Q4
    v: Q4
    o: Q4
    ffn_norm: np.ndarray
    gate: Q4
    up: Q4
    down: Q4


@dataclass
class ModelW:
    cfg: Config
    embed: Q8
    layers: list
    out_norm: np.ndarray


def unpermute_rows(w: Q4, n_head: int) -> Q4:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of the Q/K rows.

    GGUF row h*hd + 2*i + j holds HF row h*hd + j*hd/2 + i (llama.cpp rotates adjacent pairs,
    HF rotates halves). Rows are whole quantized rows, so this is exact.
    """
    hd = w.n // n_head
    idx = np.arange(w.n).reshape(n_head, 2, hd // 2).transpose(0, 2, 1).reshape(-1)
    # GGUF row r = h*hd + 2*i + j corresponds to idx position; HF row = h*hd + j*hd/2 + i
    # idx[h*hd + 2*i + j] = h*hd + j*hd/2 + i, so hf[idx[r]] = gguf[r] -> hf = gguf[argsort(idx)]
    return w.rows(np.argsort(idx))


# --------------------------------------------------------------------------------------------
# GGUF reading
# --------------------------------------------------------------------------------------------
def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: str):
    import gguf
    r = gguf.GGUFReader(path)
    arch = gguf_field(r, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"{path}: architecture {arch!r}, expected 'llama'")
    p = "llama."
    hidden = int(gguf_field(r, p + "embedding_length"))
    heads = int(gguf_field(r, p + "attention.head_count"))
    tensors = {t.name: t for t in r.tensors}
    cfg = Config(
        layers=int(gguf_field(r, p + "block_count")),
        hidden=hidden,
        heads=heads,
        kv_heads=int(gguf_field(r, p + "attention.head_count_kv")),
        head_dim=hidden // heads,
        intermediate=int(gguf_field(r, p + "feed_forward_length")),
        vocab=int(tensors["token_embd.weight"].shape[1]),
        rope_base=float(gguf_field(r, p + "rope.freq_base")),
        # stored as float32 9.99999975e-06; the model's value is 1e-5
        rms_eps=float(np.float32(gguf_field(r, p + "attention.layer_norm_rms_epsilon")).item()),
        max_context=int(gguf_field(r, p + "context_length")),
    )
    cfg.rms_eps = float(f"{cfg.rms_eps:.6g}")

    def q4(name):
        t = tensors[name]
        if t.tensor_type.name != "Q4_1":
            raise SystemExit(f"{path}: {name} is {t.tensor_type.name}, expected Q4_1")
        return parse_q4_1(np.asarray(t.data))

    def f32(name):
        return np.asarray(tensors[name].data, dtype=np.float32).copy()

    et = tensors["token_embd.weight"]
    if et.tensor_type.name != "Q8_0":
        raise SystemExit(f"{path}: token_embd.weight is {et.tensor_type.name}, expected Q8_0")
    if "output.weight" in tensors:
        raise SystemExit(f"{path}: has output.weight; this converter expects tied embeddings")
    layers = []
    for i in range(cfg.layers):
        b = f"blk.{i}."
        layers.append(LayerW(
            attn_norm=f32(b + "attn_norm.weight"),
            q=unpermute_rows(q4(b + "attn_q.weight"), cfg.heads),
            k=unpermute_rows(q4(b + "attn_k.weight"), cfg.kv_heads),
            v=q4(b + "attn_v.weight"), o=q4(b + "attn_output.weight"),
            ffn_norm=f32(b + "ffn_norm.weight"),
            gate=q4(b + "ffn_gate.weight"), up=q4(b + "ffn_up.weight"),
            down=q4(b + "ffn_down.weight")))
    model = ModelW(cfg, parse_q8_0(np.asarray(et.data)), layers, f32("output_norm.weight"))

    # tokenizer metadata
    toks = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(toks.parts[i]).decode("utf-8") for i in toks.data]
    tt = r.fields["tokenizer.ggml.token_type"]
    token_types = [int(tt.parts[i][0]) for i in tt.data]
    mf = r.fields["tokenizer.ggml.merges"]
    merges = [bytes(mf.parts[i]).decode("utf-8") for i in mf.data]
    tok = {
        "model": gguf_field(r, "tokenizer.ggml.model"),
        "pre": gguf_field(r, "tokenizer.ggml.pre"),
        "tokens": tokens, "token_types": token_types, "merges": merges,
        "bos": gguf_field(r, "tokenizer.ggml.bos_token_id"),
        "eos": gguf_field(r, "tokenizer.ggml.eos_token_id"),
        "pad": gguf_field(r, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(gguf_field(r, "tokenizer.ggml.add_bos_token", False)),
    }
    return model, tok


def tiny_model(vocab: int, seed: int = 1234) -> ModelW:
    """Random weights, small config, deterministic (the files' sha256 is stable)."""
    cfg = Config(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                 vocab=vocab, rope_base=10000.0, rms_eps=1e-5, max_context=2048)
    rng = np.random.default_rng(seed)

    def q4(n, k):
        nb = k // QK
        q = rng.integers(0, 16, size=(n, nb, QK), dtype=np.uint8)
        d = (rng.uniform(0.5, 1.5, size=(n, nb)) * 0.25 / np.sqrt(k)).astype(np.float16).astype(np.float32)
        m = (-d * rng.uniform(6.0, 9.0, size=(n, nb))).astype(np.float16).astype(np.float32)
        return Q4(q, d, m)

    def norm(n):
        return rng.uniform(0.8, 1.2, size=n).astype(np.float32)

    h, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
    layers = [LayerW(norm(h), q4(h, h), q4(kv, h), q4(kv, h), q4(h, h), norm(h),
                     q4(cfg.intermediate, h), q4(cfg.intermediate, h), q4(h, cfg.intermediate))
              for _ in range(cfg.layers)]
    nb = h // QK
    emb = Q8(rng.integers(-127, 128, size=(vocab, nb, QK)).astype(np.int8),
             (rng.uniform(0.5, 1.5, size=(vocab, nb)) / 127.0).astype(np.float16).astype(np.float32))
    return ModelW(cfg, emb, layers, norm(h))


# --------------------------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------------------------
class G:
    """Tiny helper around onnx.helper: unique names, initializers, nodes."""

    def __init__(self, prefix=""):
        self.nodes, self.inits, self.n = [], [], 0
        self.weight_bytes = 0
        self.prefix = prefix
        self.consts = {}

    def name(self, base):
        self.n += 1
        return f"{self.prefix}{base}_{self.n}"

    def init(self, name, arr, weight=True):
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.inits.append(t)
        if weight:
            self.weight_bytes += arr.nbytes
        return name

    def const(self, arr, dtype):
        arr = np.asarray(arr, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.init(self.name("c"), arr, weight=False)
        return self.consts[key]

    def op(self, op_type, inputs, n_out=1, domain=None, outs=None, **attrs):
        outs = outs or [self.name(op_type.lower()) for _ in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), **kw, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def op_named(self, op_type, inputs, outputs, **attrs):
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name("n_" + op_type), **attrs))
        return outputs[0]


def rms_norm(g: G, x: str, w: np.ndarray, eps: float, wname: str) -> str:
    # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern ORT fuses into SimplifiedLayerNormalization
    x2 = g.op("Pow", [x, g.const(2.0, np.float32)])
    ms = g.op("ReduceMean", [x2], axes=[-1], keepdims=1)
    r = g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])
    xn = g.op("Div", [x, r])
    return g.op("Mul", [xn, g.init(wname, w.astype(np.float32))])


class Linear:
    """y = x @ W.T for a Q4 weight, in the variant's representation."""

    def __init__(self, g: G, mode: str):
        self.g, self.mode = g, mode
        self._blocksums = {}

    def blocksum(self, x: str, k: int) -> str:
        if x not in self._blocksums:
            g = self.g
            r = g.op("Reshape", [x, g.const([0, 0, k // QK, QK], np.int64)])
            self._blocksums[x] = g.op("ReduceSum", [r, g.const([-1], np.int64)], keepdims=0)
        return self._blocksums[x]

    def __call__(self, x: str, w: Q4, name: str, residual: str | None = None, out: str | None = None) -> str:
        """x @ W.T (+ residual): the correction and the residual join the product in one Sum node."""
        g = self.g
        if self.mode == "fp32":
            wt = w.dequant().T.copy()
            y = g.op("MatMul", [x, g.init(name + ".weight", wt)])
            if not residual:
                return y
            return g.op("Add", [residual, y], outs=[out] if out else None)
        # MatMulNBits: w = scale * (q - zp) with uint8 zp = round(-m/d) in 0..15, plus the exact
        # per-block correction (m + d*zp) * sum(x over the block) through a small MatMul.
        n, k, nb = w.n, w.k, w.k // QK
        packed = (w.q[:, :, 0::2] | (w.q[:, :, 1::2] << 4)).astype(np.uint8)  # [N, nb, 16]
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(w.d != 0, np.rint(-w.m / w.d), 0.0)
        zp = np.clip(zp, 0, 15).astype(np.uint8)
        zp_pad = zp if nb % 2 == 0 else np.concatenate([zp, np.zeros((n, 1), np.uint8)], 1)
        zp_packed = (zp_pad[:, 0::2] | (zp_pad[:, 1::2] << 4)).astype(np.uint8)  # [N, ceil(nb/2)]
        corr = (w.m.astype(np.float64) + w.d.astype(np.float64) * zp).astype(np.float32)  # [N, nb]
        acc = 4 if self.mode == "q4-fast" else 0
        y = g.op("MatMulNBits", [x, g.init(name + ".qweight", packed),
                                 g.init(name + ".scales", w.d.reshape(-1).astype(np.float32)),
                                 g.init(name + ".zero_points", zp_packed.reshape(-1))],
                 domain="com.microsoft", K=k, N=n, bits=4, block_size=QK, accuracy_level=acc)
        terms = [residual] if residual else []
        terms.append(y)
        if np.any(corr):
            terms.append(g.op("MatMul", [self.blocksum(x, k), g.init(name + ".block_correction", corr.T.copy())]))
        if len(terms) == 1:
            assert out is None
            return y
        return g.op("Sum", terms, outs=[out] if out else None)


def build_layers(model: ModelW, start: int, end: int, mode: str) -> tuple[onnx.ModelProto, int]:
    """Decoder layers [start, end) around com.microsoft GroupQueryAttention.

    The KV cache is a buffer of the request's maximum length that the caller passes as past_* and
    binds as present_* too: GQA then writes the S new rows in place (nothing grows by copying).
    RoPE happens inside GQA from the rope_cos/rope_sin tables (a graph input shared by every layer,
    so no layer file carries a copy) at the positions total_sequence_length - S ..
    total_sequence_length - 1; the causal mask is GQA's own.
    """
    cfg = model.cfg
    g = G()
    lin = Linear(g, mode)
    H, nh, nkv, hd = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", H]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("rope_cos", TensorProto.FLOAT, ["R", hd // 2]),
              helper.make_tensor_value_info("rope_sin", TensorProto.FLOAT, ["R", hd // 2])]
    outputs = [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [1, "S", H])]
    for i in range(start, end):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, [1, nkv, "C", hd]))
    for i in range(start, end):
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, [1, nkv, "C", hd]))

    i64 = np.int64
    x = "hidden"
    for i in range(start, end):
        L = model.layers[i]
        pre = f"layer{i}"
        xn = rms_norm(g, x, L.attn_norm, cfg.rms_eps, f"{pre}.attn_norm.weight")
        # 1/sqrt(head_dim) folded into the Q rows (a power of two for head_dim 64 and 16: exact),
        # so GQA runs with scale 1; RoPE is linear, so rotating the scaled rows is the same.
        qscale = 1.0 / np.sqrt(hd)
        assert float(qscale).is_integer() or np.log2(qscale).is_integer()
        qkv = lin(xn, Q4.cat([L.q.scaled(qscale), L.k, L.v]), f"{pre}.qkv")  # packed [1, S, (nh + 2 nkv) hd]
        # present_* are GQA's own outputs (no Identity): bound to the past_* buffer, written in place
        ctx = g.op("GroupQueryAttention",
                   [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                    "rope_cos", "rope_sin"], domain="com.microsoft",
                   outs=[g.name("attn"), f"present_key_{i}", f"present_value_{i}"],
                   num_heads=nh, kv_num_heads=nkv, scale=1.0, do_rotary=1, rotary_interleaved=0)[0]
        h = lin(ctx, L.o, f"{pre}.o", residual=x)
        hn = rms_norm(g, h, L.ffn_norm, cfg.rms_eps, f"{pre}.ffn_norm.weight")
        gu = lin(hn, Q4.cat([L.gate, L.up]), f"{pre}.gate_up")
        gate, up = g.op("Split", [gu, g.const([cfg.intermediate, cfg.intermediate], i64)], n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = lin(act, L.down, f"{pre}.down", residual=h, out="hidden_out" if i == end - 1 else None)
    return make_model(g, f"layers_{start:03d}_{end:03d}", inputs, outputs, mode), g.weight_bytes


def build_embed(model: ModelW, mode: str):
    cfg = model.cfg
    g = G()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", cfg.hidden])]
    if mode == "fp32":
        g.op_named("Gather", [g.init("embed.weight", model.embed.dequant()), "input_ids"], ["hidden"], axis=0)
    else:  # exact Q8_0: int8 rows times their fp16 block scales (exact in float32)
        nb = cfg.hidden // QK
        qrows = g.op("Gather", [g.init("embed.q8", model.embed.q.reshape(cfg.vocab, cfg.hidden)), "input_ids"], axis=0)
        qf = g.op("Reshape", [g.op("Cast", [qrows], to=TensorProto.FLOAT), g.const([0, 0, nb, QK], np.int64)])
        sc = g.op("Unsqueeze", [g.op("Gather", [g.init("embed.scales", model.embed.d), "input_ids"], axis=0),
                                g.const([-1], np.int64)])
        g.op_named("Reshape", [g.op("Mul", [qf, sc]), g.const([0, 0, cfg.hidden], np.int64)], ["hidden"])
    return make_model(g, "embed", inputs, outputs, mode), g.weight_bytes


def build_head(model: ModelW, mode: str):
    cfg = model.cfg
    g = G()
    inputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", cfg.hidden])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", cfg.vocab])]
    xn = rms_norm(g, "hidden", model.out_norm, cfg.rms_eps, "output_norm.weight")
    if mode == "fp32":
        g.op_named("MatMul", [xn, g.init("lm_head.weight", model.embed.dequant().T.copy())], ["logits"])
    elif mode == "q4-fast":
        # 8-bit activations anyway: the Q8_0 embedding as one 8-bit MatMulNBits (q + 128 with the
        # default zero point 128), 20 % faster than two 4-bit ones with accuracy_level 4.
        nb = cfg.hidden // QK
        q8 = (model.embed.q.astype(np.int16) + 128).astype(np.uint8).reshape(cfg.vocab, nb, QK)
        g.op_named("MatMulNBits", [xn, g.init("lm_head.q8", q8), g.init("lm_head.scales", model.embed.d.reshape(-1))],
                   ["logits"], domain="com.microsoft", K=cfg.hidden, N=cfg.vocab, bits=8, block_size=QK,
                   accuracy_level=4)
    else:
        # Tied Q8_0 embedding, exact, as two 4-bit MatMulNBits: q = 16 * hi + lo with lo = q mod 16
        # (0..15, zero point 0) and hi = (q - lo) / 16 (-8..7, stored as hi + 8 with the default zero
        # point 8, scale 16 * d). An 8-bit MatMulNBits with float activations is 40x slower (ORT 1.31).
        nb = cfg.hidden // QK
        q = model.embed.q.astype(np.int16)  # [V, nb, 32]
        lo = (q & 15).astype(np.uint8)
        hi = ((q - lo) // 16 + 8).astype(np.uint8)
        acc = 0

        def pack(x):
            return (x[:, :, 0::2] | (x[:, :, 1::2] << 4)).astype(np.uint8)
        zp0 = np.zeros(cfg.vocab * ((nb + 1) // 2), np.uint8)
        y_hi = g.op("MatMulNBits", [xn, g.init("lm_head.hi4", pack(hi)),
                                    g.init("lm_head.hi_scales", (model.embed.d * 16).reshape(-1))],
                    domain="com.microsoft", K=cfg.hidden, N=cfg.vocab, bits=4, block_size=QK, accuracy_level=acc)
        y_lo = g.op("MatMulNBits", [xn, g.init("lm_head.lo4", pack(lo)), g.init("lm_head.lo_scales", model.embed.d.reshape(-1)),
                                    g.init("lm_head.lo_zero_points", zp0)],
                    domain="com.microsoft", K=cfg.hidden, N=cfg.vocab, bits=4, block_size=QK, accuracy_level=acc)
        g.op_named("Add", [y_hi, y_lo], ["logits"])
    return make_model(g, "head", inputs, outputs, mode), g.weight_bytes


def make_model(g: G, name, inputs, outputs, mode):
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == "com.microsoft" for n in g.nodes):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="aerokv-convert",
                          producer_version=str(CONVERTER_VERSION))
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m)
    return m


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def build_tokenizer(tok: dict) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if tok["model"] != "gpt2" or tok["pre"] != "smollm":
        raise SystemExit(f"tokenizer {tok['model']}/{tok['pre']}: expected gpt2/smollm")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    t.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    control = [tok["tokens"][i] for i, ty in enumerate(tok["token_types"]) if ty == 3]
    t.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in control])
    if len(control) != 17:
        log(f"warning: {len(control)} control tokens (expected 17)")
    return t.to_str(pretty=False)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save(m: onnx.ModelProto, path: str) -> None:
    with open(path, "wb") as f:
        f.write(m.SerializeToString(deterministic=True))


def convert(gguf_path: str, variant: str, out: str, group: int = 1) -> dict:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    t0 = time.time()
    log(f"reading {gguf_path}")
    model, tok = read_gguf(gguf_path)
    gguf_sha = sha256_file(gguf_path)
    mode = variant
    if variant == "tiny":
        model = tiny_model(model.cfg.vocab)
        mode = "q4"
    cfg = model.cfg
    if group < 1:
        raise SystemExit("--group must be >= 1")
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = []

    def add(name, kind, extra=None, weight_bytes=None):
        p = os.path.join(tmp, name)
        e = {"name": name, "kind": kind}
        e.update(extra or {})
        e["bytes"] = os.path.getsize(p)
        e["sha256"] = sha256_file(p)
        if weight_bytes is not None:
            e["weight_bytes"] = weight_bytes
        files.append(e)

    log(f"{variant}: embed")
    m, wb = build_embed(model, mode)
    save(m, os.path.join(tmp, "embed.onnx"))
    add("embed.onnx", "embed")
    for s in range(0, cfg.layers, group):
        e = min(s + group, cfg.layers)
        log(f"{variant}: converting layer{'s' if e - s > 1 else ''} "
            f"{s + 1}{'-' + str(e) if e - s > 1 else ''}/{cfg.layers}")
        name = f"layers_{s:03d}_{e:03d}.onnx"
        m, wb = build_layers(model, s, e, mode)
        save(m, os.path.join(tmp, name))
        add(name, "layers", {"start": s, "end": e}, wb)
    log(f"{variant}: head")
    m, wb = build_head(model, mode)
    save(m, os.path.join(tmp, "head.onnx"))
    add("head.onnx", "head")
    with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(build_tokenizer(tok))
    add("tokenizer.json", "tokenizer")

    vocab = tok["tokens"]
    weights = {"fp32": "q4_1 dequantized to float32 (embedding: q8_0 dequantized)",
               "q4": "MatMulNBits 4-bit exact to q4_1 (uint8 zero point + block correction); head = two 4-bit MatMulNBits exact to q8_0",
               "q4-fast": "as q4, accuracy_level 4 (8-bit activations); head = one 8-bit MatMulNBits exact to q8_0",
               "tiny": "random (seed 1234), stored as in q4"}[variant]
    manifest = {
        "format": FORMAT,
        "model": MODEL_NAME if variant != "tiny" else MODEL_NAME + "-tiny-random",
        "variant": variant,
        "source": {"file": os.path.basename(gguf_path), "sha256": gguf_sha},
        "architecture": cfg.as_json(),
        "tokens": {"bos": tok["bos"], "eos": tok["eos"], "im_start": vocab.index("<|im_start|>"),
                   "im_end": vocab.index("<|im_end|>"), "pad": tok["pad"]},
        "chat_template": CHAT_TEMPLATE,
        "add_bos": tok["add_bos"],
        "layers_per_file": group,
        "weights": weights,
        "converter_version": CONVERTER_VERSION,
        "files": files,
    }
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    total = sum(e["bytes"] for e in files)
    log(f"{variant}: wrote {out} ({len(files)} files, {total / 1e6:.1f} MB) in {time.time() - t0:.1f} s")
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--group", type=int, default=1, help="decoder layers per file (default 1)")
    a = ap.parse_args(argv)
    if not os.path.isfile(a.gguf):
        raise SystemExit(f"{a.gguf}: not found; run `make setup` (models/setup.sh fetches it)")
    convert(a.gguf, a.variant, a.out, a.group)


if __name__ == "__main__":
    main()
