"""Every process that loads model files checks them against the manifest's sha256 at every load.
A copy of the model with one byte flipped in one layer file (same size, same modification time)
is refused by `aerokv generate` and by a shard executor, each naming the file; an unchanged file
is hashed once and afterwards recognised by its identity (the cost of both is printed)."""
import os
import re
import shutil
import subprocess

import pytest
from conftest import BIN, MODELS

VARIANT = "tiny"
CHECKED = re.compile(r"model files checked against the manifest.*?files=(\d+) hashed_files=(\d+) hashed_mb=([\d.]+) ms=([\d.]+)")


@pytest.fixture
def model_copy(tmp_path):
    root = tmp_path / "models"
    # Without the integrity cache: the copy starts unverified.
    shutil.copytree(MODELS / VARIANT, root / VARIANT, ignore=shutil.ignore_patterns(".*"))
    return root


def generate(root):
    return subprocess.run(
        [BIN / "aerokv", "generate", "--variant", VARIANT, "--models", root, "--user", "Hi", "--max-tokens", "2", "--json"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, RUST_LOG="info"))


def flip_a_byte(path):
    """One bit of the middle byte, size and modification time kept."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def victim(root):
    return root / VARIANT / "layers_001_002.onnx"


def test_generate_hashes_once_then_refuses_a_flipped_byte_naming_the_file(model_copy):
    first = generate(model_copy)
    assert first.returncode == 0, first.stderr[-3000:]
    checked = [m.groups() for m in CHECKED.finditer(first.stderr)]
    assert checked, first.stderr[-3000:]
    hashed = sum(int(h) for _, h, _, _ in checked)
    n_files = len(list((model_copy / VARIANT).glob("*.onnx"))) + 1  # and tokenizer.json
    assert hashed == n_files, checked
    assert (model_copy / VARIANT / ".integrity-cache.json").is_file()
    # A new process finds the files unchanged: nothing is hashed again.
    second = generate(model_copy)
    assert second.returncode == 0 and not CHECKED.search(second.stderr), second.stderr[-3000:]
    print(f"first load hashed {hashed} files in {sum(float(ms) for *_, ms in checked):.1f} ms; the second hashed none")

    flip_a_byte(victim(model_copy))
    bad = generate(model_copy)
    assert bad.returncode != 0
    assert victim(model_copy).name in bad.stderr and "sha256" in bad.stderr, bad.stderr[-3000:]


def test_shard_executor_refuses_a_flipped_byte_naming_the_file(model_copy, ros_domain):
    flip_a_byte(victim(model_copy))
    r = subprocess.run(
        [BIN / "shard_executor", "--ros-args", "-r", "__ns:=/uav1", "-p", f"models_dir:={model_copy}", "-p", f"variant:={VARIANT}"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr[-3000:]
    assert victim(model_copy).name in r.stderr and "sha256" in r.stderr, r.stderr[-3000:]
