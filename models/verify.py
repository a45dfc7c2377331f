#!/usr/bin/env python3
"""Verify converted model variants against their manifest.json (sha256 and size of every file).

    python models/verify.py models/generated/q4 [more variant dirs ...]
        [--gguf-sha256 HEX] [--converter-version N | --current] [--group N] [--list-bad]

Exit status 0 when every directory is complete and intact, 1 otherwise; every problem is
printed on its own line as `<path>: <what is wrong>; run `make setup``.
Hashing is cheap here (~0.8 GB/s, about 1.5 s for all variants), so every file is hashed on
every call: no cache that could hide a corrupted file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

REQUIRED_KINDS = ("embed", "head", "tokenizer")


def current_converter_version() -> int:
    """CONVERTER_VERSION of models/convert.py, read without importing it (onnx is slow to import)."""
    import re
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert.py"), encoding="utf-8") as f:
        return int(re.search(r"^CONVERTER_VERSION = (\d+)", f.read(), re.M).group(1))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(variant_dir: str, gguf_sha256: str | None = None, converter_version: int | None = None,
           group: int | None = None, fix_hint: str = "run `make setup`") -> list[str]:
    """Returns a list of problems (empty when the variant is complete and intact)."""
    d = variant_dir.rstrip("/")
    mpath = os.path.join(d, "manifest.json")
    if not os.path.isfile(mpath):
        return [f"{mpath}: missing; {fix_hint}"]
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
        files = man["files"]
    except (ValueError, KeyError, OSError) as e:
        return [f"{mpath}: unreadable ({e}); {fix_hint}"]
    problems = []
    if gguf_sha256 and man.get("source", {}).get("sha256") != gguf_sha256:
        problems.append(f"{mpath}: converted from another GGUF (source sha256 differs); {fix_hint}")
    if converter_version is not None and man.get("converter_version") != converter_version:
        problems.append(f"{mpath}: written by converter version {man.get('converter_version')}, "
                        f"current is {converter_version}; {fix_hint}")
    if group is not None and man.get("layers_per_file") != group:
        problems.append(f"{mpath}: {man.get('layers_per_file')} layers per file, expected {group}; {fix_hint}")
    kinds = {e.get("kind") for e in files}
    for k in REQUIRED_KINDS:
        if k not in kinds:
            problems.append(f"{mpath}: no '{k}' file listed; {fix_hint}")
    # layer files must cover [0, layers) exactly
    L = man.get("architecture", {}).get("layers")
    spans = sorted((e["start"], e["end"]) for e in files if e.get("kind") == "layers")
    at = 0
    for s, e in spans:
        if s != at or e <= s:
            problems.append(f"{mpath}: layer files do not tile [0, {L}) (at {at}: [{s}, {e})); {fix_hint}")
            break
        at = e
    else:
        if at != L:
            problems.append(f"{mpath}: layer files end at {at}, architecture has {L} layers; {fix_hint}")
    for e in files:
        p = os.path.join(d, e["name"])
        if not os.path.isfile(p):
            problems.append(f"{p}: missing; {fix_hint}")
            continue
        size = os.path.getsize(p)
        if size != e["bytes"]:
            problems.append(f"{p}: size {size} bytes, manifest says {e['bytes']}; {fix_hint}")
            continue
        if sha256_file(p) != e["sha256"]:
            problems.append(f"{p}: sha256 mismatch; {fix_hint}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--gguf-sha256")
    ap.add_argument("--converter-version", type=int)
    ap.add_argument("--group", type=int)
    ap.add_argument("--current", action="store_true",
                    help="also require the converter version of models/convert.py")
    ap.add_argument("--list-bad", action="store_true",
                    help="print the directories that fail on stdout (one a line), exit 0")
    a = ap.parse_args(argv)
    cv = current_converter_version() if a.current else a.converter_version
    bad = 0
    for d in a.dirs:
        probs = verify(d, a.gguf_sha256, cv, a.group)
        for p in probs:
            print(p, file=sys.stderr)
        if probs and a.list_bad:
            print(d)
        bad += bool(probs)
    return 1 if bad and not a.list_bad else 0


if __name__ == "__main__":
    sys.exit(main())
