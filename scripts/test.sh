#!/usr/bin/env bash
# Every test: the Rust unit and integration tests, then the Python tests (rclpy as an independent
# ROS 2 program, colcon, the model references) inside a private network namespace (`unshare -n`).
# Extra arguments go to pytest (e.g. `scripts/test.sh -k rclpy`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
source scripts/env.sh

echo "== cargo fmt --check (style: rustfmt.toml)"
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --all --check
else
    echo "rustfmt is not part of this machine's Rust toolchain: style not checked"
fi

echo "== cargo test (workspace, release)"
cargo test --release --workspace -q 2>&1 | grep -v '^$'

echo "== pytest (inside unshare -n: no traffic can leave this machine)"
exec unshare -n -- bash -c 'ip link set lo up 2>/dev/null || true; exec python -m pytest test -q -p no:cacheprovider "$@"' pytest "$@"
