"""The Rust engine (`aerokv generate`, q4) against the independent float64 numpy reference
(models/reference.py, which reads the GGUF itself and shares no code with the converter or the
engine).

For 3 prompts x 32 greedy tokens (the third, LONG_PROMPT, is fed in several prefill chunks) and a
~1,950-token prompt x 4 tokens (16 chunks: attention deep into the in-place KV cache):
- the engine's prompt ids equal the `tokenizers` (Python) encoding of the chat prompt;
- the engine's greedy tokens equal the reference's (the reference keeps a final EOS, the engine
  drops it);
- the first-step logits agree within LOGIT_TOL (absolute, over the whole vocabulary).
  Why 1e-3: the q4 variant is exact to the Q4_1 weights, so the only differences are float32
  accumulation order in ONNX Runtime vs float64 numpy; measured max |diff| is ~3e-5 on logits of
  magnitude ~20, and a real bug (RoPE, GQA, norm) shows up as differences > 1.

Env: AEROKV_BIN (default target/release/aerokv), AEROKV_MODELS, ORT_DYLIB_PATH.
The engine's first-step logits come from its hidden `--dump-first-logits FILE` option (.npy).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LONG_PROMPT

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("AEROKV_BIN", ROOT / "target" / "release" / "aerokv"))
MODELS = Path(os.environ.get("AEROKV_MODELS", ROOT / "models" / "generated"))
DEFAULT_ORT = ROOT / ".venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"
# (prompt, greedy tokens): the last one is ~1,950 tokens (16 prefill chunks), so attention reads
# far into the in-place KV cache; few tokens keep its float64 reference short (~30 s of CPU).
PROMPTS = [
    ("Explain in two sentences why the sky is blue.", 32),
    ("Write a short poem about a drone flying over the sea.", 32),
    (LONG_PROMPT, 32),
    (" ".join([LONG_PROMPT] * 7), 4),
]
LOGIT_TOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    gguf = MODELS / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file() or not (MODELS / "q4" / "manifest.json").is_file():
        pytest.fail(f"model parts missing under {MODELS}: run `make setup`")
    sys.path.insert(0, str(ROOT / "models"))
    import reference as ref  # noqa: E402  (models/reference.py)
    return ref


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODELS / "q4" / "tokenizer.json"))


def run_engine(user: str, max_tokens: int, tmp_path: Path) -> dict:
    if not BIN.is_file():
        pytest.fail(f"{BIN} not built: run `make build` (or set AEROKV_BIN)")
    env = dict(os.environ)
    env.setdefault("AEROKV_MODELS", str(MODELS))
    env.setdefault("ORT_DYLIB_PATH", str(DEFAULT_ORT))
    logits_file = tmp_path / "first_logits.npy"
    out = subprocess.run(
        [str(BIN), "generate", "--user", user, "--max-tokens", str(max_tokens), "--variant", "q4",
         "--json", "--dump-first-logits", str(logits_file)],
        capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"aerokv generate failed:\n{out.stderr}"
    result = json.loads(out.stdout)
    result["first_logits"] = np.load(logits_file)
    return result


@pytest.mark.parametrize("user,max_tokens", PROMPTS, ids=["sky", "poem", "long", "2k-context"])
def test_engine_matches_float64_reference(user, max_tokens, reference, tokenizer, tmp_path):
    engine = run_engine(user, max_tokens, tmp_path)
    chat = reference.CHAT.replace("{user}", user)
    assert engine["prompt_ids"] == tokenizer.encode(chat).ids

    ref = reference.greedy(engine["prompt_ids"], max_tokens=max_tokens)
    ref_tokens = list(ref["tokens"])
    if ref["stopped_at_eos"]:
        ref_tokens = ref_tokens[:-1]
    assert engine["tokens"] == ref_tokens, (
        f"engine: {tokenizer.decode(engine['tokens'])!r}\nreference: {tokenizer.decode(ref_tokens)!r}")
    assert engine["text"] == tokenizer.decode(engine["tokens"])

    ours = engine["first_logits"].astype(np.float64)
    theirs = np.asarray(ref["first_logits"], dtype=np.float64)
    assert ours.shape == theirs.shape == (49152,)
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"{user[:40]!r}... ({len(engine['prompt_ids'])} prompt tokens): {len(engine['tokens'])} tokens equal; "
          f"first-step max |logit diff| = {diff:.2e}")
    assert diff < LOGIT_TOL, f"first-step logits differ by up to {diff} (tolerance {LOGIT_TOL})"
    assert engine["tokens_per_s"] > 0
