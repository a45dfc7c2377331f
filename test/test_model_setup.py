"""Model set-up tests (run by `make test` after `make setup`).

Locates the generated parts through AEROKV_MODELS (default <repo>/models/generated).
Never modifies the real parts: corruption tests work on copies in a temp dir.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

# One BLAS thread: float64 matvecs are memory-bound, and OpenBLAS's spinning threads are ~8x
# slower than one thread on a shared, loaded 2-core machine (measured 12.4 s vs 1.6 s).
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_SRC = os.path.join(ROOT, "models")
sys.path.insert(0, MODELS_SRC)
MODELS = os.environ.get("AEROKV_MODELS", os.path.join(ROOT, "models", "generated"))
GGUF = os.path.join(MODELS, "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
CHAT = "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
VARIANTS = ["fp32", "q4", "q4-fast", "tiny"]
REAL_ARCH = {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64, "intermediate": 1536,
             "vocab": 49152, "rope_base": 100000.0, "rms_eps": 1e-5, "max_context": 8192}
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                  "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                  "<jupyter_script>", "<empty_output>"]


def vdir(v):
    d = os.path.join(MODELS, v)
    if not os.path.isfile(os.path.join(d, "manifest.json")):
        pytest.fail(f"{d}/manifest.json missing; run `make setup`")
    return d


def manifest(v):
    with open(os.path.join(vdir(v), "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# manifest and files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", VARIANTS)
def test_manifest_follows_contract(v):
    m = manifest(v)
    assert m["format"] == 2  # 2: KV caches updated in place (GroupQueryAttention)
    assert m["variant"] == v
    assert m["model"].startswith("SmolLM2-135M-Instruct")
    assert m["chat_template"] == CHAT
    assert m["tokens"]["eos"] == 2 and m["tokens"]["im_start"] == 1 and m["tokens"]["im_end"] == 2
    assert m["tokens"]["bos"] == 1
    a = m["architecture"]
    assert set(REAL_ARCH) <= set(a)
    if v != "tiny":
        assert a == REAL_ARCH
    else:
        assert a["vocab"] == 49152 and a["heads"] % a["kv_heads"] == 0
        assert a["hidden"] == a["heads"] * a["head_dim"]
    src = m["source"]
    assert src["file"] == os.path.basename(GGUF) and re.fullmatch(r"[0-9a-f]{64}", src["sha256"])
    kinds = [e["kind"] for e in m["files"]]
    assert kinds.count("embed") == 1 and kinds.count("head") == 1 and kinds.count("tokenizer") == 1
    names = {e["kind"]: e["name"] for e in m["files"] if e["kind"] != "layers"}
    assert names == {"embed": "embed.onnx", "head": "head.onnx", "tokenizer": "tokenizer.json"}
    layers = sorted((e for e in m["files"] if e["kind"] == "layers"), key=lambda e: e["start"])
    at = 0
    for e in layers:
        assert e["start"] == at and e["end"] > e["start"]
        assert e["name"] == f"layers_{e['start']:03d}_{e['end']:03d}.onnx"
        assert e["end"] - e["start"] == m["layers_per_file"] or e["end"] == a["layers"]
        assert 0 < e["weight_bytes"] < e["bytes"]
        at = e["end"]
    assert at == a["layers"]
    for e in m["files"]:
        assert os.path.getsize(os.path.join(vdir(v), e["name"])) == e["bytes"]


def test_gguf_matches_pinned_sha256():
    from verify import sha256_file
    with open(os.path.join(MODELS_SRC, "setup.sh"), encoding="utf-8") as f:
        pinned = re.search(r'GGUF_SHA256="([0-9a-f]{64})"', f.read()).group(1)
    assert sha256_file(GGUF) == pinned
    for v in VARIANTS:
        assert manifest(v)["source"]["sha256"] == pinned


@pytest.mark.parametrize("v", VARIANTS)
def test_every_file_matches_its_sha256(v):
    from verify import current_converter_version, verify
    assert verify(vdir(v), converter_version=current_converter_version()) == []


@pytest.mark.parametrize("v", ["q4", "tiny"])
def test_graph_inputs_outputs_follow_contract(v):
    import onnx
    from onnx import TensorProto
    d, m = vdir(v), manifest(v)
    a = m["architecture"]

    def io(path):
        g = onnx.load(path)
        assert g.ir_version <= 13
        assert {o.domain: o.version for o in g.opset_import}.get("", None) == 17
        def sig(vi):
            t = vi.type.tensor_type
            return vi.name, t.elem_type, [x.dim_value or x.dim_param for x in t.shape.dim]
        return [sig(x) for x in g.graph.input], [sig(x) for x in g.graph.output]

    F, I, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    ins, outs = io(os.path.join(d, "embed.onnx"))
    assert [(n, t) for n, t, _ in ins] == [("input_ids", I)] and outs[0][:2] == ("hidden", F)
    assert outs[0][2][0] == 1 and outs[0][2][2] == a["hidden"]
    ins, outs = io(os.path.join(d, "head.onnx"))
    assert ins[0][:2] == ("hidden", F) and outs[0][:2] == ("logits", F) and outs[0][2][2] == a["vocab"]
    for e in (e for e in m["files"] if e["kind"] == "layers"):
        ins, outs = io(os.path.join(d, e["name"]))
        r = range(e["start"], e["end"])
        step = ["hidden", "seqlens_k", "total_sequence_length", "rope_cos", "rope_sin"]
        assert [n for n, _, _ in ins] == step + [f"past_{k}_{i}" for i in r for k in ("key", "value")]
        assert [n for n, _, _ in outs] == ["hidden_out"] + [f"present_{k}_{i}" for i in r for k in ("key", "value")]
        assert [(t, shape) for _, t, shape in ins[1:3]] == [(I32, [1]), (I32, [])]
        assert all(t == F and shape[1] == a["head_dim"] // 2 for _, t, shape in ins[3:5])
        for n, t, shape in ins[5:] + outs[1:]:
            assert t == F and shape[0] == 1 and shape[1] == a["kv_heads"] and shape[3] == a["head_dim"], (n, shape)
            assert shape[2] == "C", (n, shape)  # past and present: the same buffer of the cache's capacity


def test_q4_weights_are_exactly_the_gguf_q4_1_weights():
    """Rebuild one projection from the q4 file's initializers and compare with gguf's own dequantizer."""
    import gguf
    import onnx
    from onnx import numpy_helper
    g = onnx.load(os.path.join(vdir("q4"), "layers_007_008.onnx"))
    w = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    packed, scales = w["layer7.o.qweight"], w["layer7.o.scales"].astype(np.float64)
    zp_packed, corr = w["layer7.o.zero_points"], w["layer7.o.block_correction"].astype(np.float64)
    n, nb, _ = packed.shape
    q = np.empty((n, nb, 32), np.float64)
    q[:, :, 0::2], q[:, :, 1::2] = packed & 15, packed >> 4
    zp = np.stack([zp_packed.reshape(n, -1) & 15, zp_packed.reshape(n, -1) >> 4], -1).reshape(n, -1)[:, :nb]
    rebuilt = (scales.reshape(n, nb, 1) * (q - zp[:, :, None]) + corr.T[:, :, None]).reshape(n, nb * 32)
    r = gguf.GGUFReader(GGUF)
    t = next(t for t in r.tensors if t.name == "blk.7.attn_output.weight")
    ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
    assert rebuilt.shape == ref.shape
    np.testing.assert_allclose(rebuilt, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# corruption is detected (on copies) and repaired by models/setup.sh
# ---------------------------------------------------------------------------------------------
def test_verify_names_a_corrupted_or_missing_file(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(vdir("tiny"), copy)
    victim = copy / "layers_002_003.onnx"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    (copy / "head.onnx").unlink()
    p = subprocess.run([sys.executable, os.path.join(MODELS_SRC, "verify.py"), str(copy)],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert f"{victim}: sha256 mismatch" in p.stderr
    assert f"{copy / 'head.onnx'}: missing" in p.stderr
    assert "embed.onnx" not in p.stderr  # intact files are not reported
    # the pristine directory passes
    p = subprocess.run([sys.executable, os.path.join(MODELS_SRC, "verify.py"), vdir("tiny")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_setup_regenerates_a_corrupted_variant(tmp_path):
    gen = tmp_path / "generated"
    (gen / "gguf").mkdir(parents=True)
    os.symlink(GGUF, gen / "gguf" / os.path.basename(GGUF))
    shutil.copytree(vdir("tiny"), gen / "tiny")
    victim = gen / "tiny" / "layers_001_002.onnx"
    with open(victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    env = dict(os.environ, AEROKV_MODELS=str(gen), PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(MODELS_SRC, "setup.sh"), "--variants", "tiny"],
                       capture_output=True, text=True, env=env, cwd="/", timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert f"{victim}: sha256 mismatch" in out
    assert "converting tiny" in out
    from verify import verify
    assert verify(str(gen / "tiny")) == []
    # identical to the real one (deterministic conversion)
    assert json.loads((gen / "tiny" / "manifest.json").read_text())["files"] == manifest("tiny")["files"]
    # a second run on the now-ready copy converts nothing
    p = subprocess.run(["bash", os.path.join(MODELS_SRC, "setup.sh"), "--variants", "tiny"],
                       capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert p.returncode == 0 and "converting" not in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(vdir("q4"), "tokenizer.json"))


def test_tokenizer_chat_template_round_trip(tok):
    text = CHAT.replace("{user}", "What is the capital of France? Answer in 12 words.")
    ids = tok.encode(text).ids
    assert ids[0] == 1  # <|im_start|>, no BOS added in front
    assert ids.count(1) == 2 and ids.count(2) == 1  # each special token is a single id
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    # the same tokenizer file in every variant
    for v in VARIANTS:
        assert manifest(v)["files"][-1]["sha256"] == manifest("q4")["files"][-1]["sha256"]


def test_tokenizer_special_tokens_digits_and_no_prefix_space(tok):
    for i, t in enumerate(CONTROL_TOKENS):
        assert tok.encode(t).ids == [i], t
        assert tok.encode(f"a{t}b").ids[1] == i
    assert tok.encode("2024").ids == [tok.token_to_id(c) for c in "2024"]  # individual digits
    assert tok.encode("Hello").ids == [tok.token_to_id("Hello")]  # no prefix space
    assert tok.encode(" Hello").ids == [tok.token_to_id("ĠHello")]
    s = "naïve café — 東京 🚁\n\ttabs"
    assert tok.decode(tok.encode(s).ids) == s  # byte-level: any text round-trips


# ---------------------------------------------------------------------------------------------
# ONNX Runtime (part by part, KV caches) vs the independent float64 reference
# ---------------------------------------------------------------------------------------------
LOGIT_TOL = 1e-3  # measured: <= 7e-5 for q4 and fp32 (logits reach ~25)


def test_q4_matches_the_reference(tok):
    import reference
    from ort_runner import OrtModel, greedy
    ids = tok.encode(CHAT.replace("{user}", "What is the capital of France?")).ids
    n = 10
    ref = reference.greedy(ids, n, gguf_path=GGUF, eos=-1)
    m = OrtModel(vdir("q4"), threads=1)
    toks, first, _ = greedy(m, ids, n, eos=-1)
    assert toks == ref["tokens"]
    assert tok.decode(toks).startswith("The capital of France is Paris.")
    diff = np.abs(first.astype(np.float64) - ref["first_logits"]).max()
    assert diff < LOGIT_TOL, diff
    # a prompt fed in two chunks (P > 0 and S > 1) gives the same logits
    m.reset()
    m.forward(ids[:7])
    chunked = m.forward(ids[7:])[-1]
    assert np.abs(chunked.astype(np.float64) - ref["first_logits"]).max() < LOGIT_TOL


def test_tiny_runs_and_kv_grows():
    from ort_runner import OrtModel
    m = OrtModel(vdir("tiny"), threads=1)
    a = m.manifest["architecture"]
    ids = [1, 4093, 198, 1780, 314, 260, 3575, 2]
    batch = m.forward(ids)
    assert batch.shape == (len(ids), a["vocab"]) and np.isfinite(batch).all()
    assert m.past[a["layers"] - 1][0].shape == (1, a["kv_heads"], 512, a["head_dim"])  # the capacity
    assert np.any(m.past[a["layers"] - 1][0][:, :, len(ids) - 1]) and not np.any(m.past[a["layers"] - 1][0][:, :, len(ids):])
    # one token at a time gives the same logits as the batch (causal mask and positions agree)
    m.reset()
    steps = np.array([m.forward([t])[-1] for t in ids])
    assert np.abs(steps - batch).max() < 1e-4 * max(1.0, np.abs(batch).max())
    # and the last token's logits depend on the context (attention really reads the cache)
    m.reset()
    alone = m.forward(ids[-1:])[-1]
    assert np.abs(alone - batch[-1]).max() > 1e-3
