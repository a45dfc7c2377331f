#!/usr/bin/env bash
# One-command, idempotent set-up: Debian packages, the Python 3.11 venv with ROS 2 jazzy (PyPI
# wheels) and ONNX Runtime, the wheels' fix-ups, this package's interfaces, scripts/env.sh and
# the model parts. Every make target runs it first; on a ready machine it is a fast no-op.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The venv lives outside the source tree: CMake refuses exported include paths (numpy's) that
# lie inside the source directory. `.venv` in the checkout is a symlink to it for convenience.
VENV="${AEROKV_VENV:-$HOME/.cache/aerokv/venv-jazzy}"
STAMPS="$ROOT/build/stamps"
mkdir -p "$STAMPS"
log() { printf '[setup] %s\n' "$*"; }
t0=$SECONDS

# --- 1. Debian packages -------------------------------------------------------------------
# ns3, libns3-dev, g++: the radio emulator of `aerokv swarm --radio` (radio/aerokv_radio.cc).
APT_PACKAGES=(cmake libclang-dev patchelf fonts-dejavu-core iproute2 util-linux ns3 libns3-dev g++)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 2. Python venv: ROS 2 jazzy wheels, ONNX Runtime, model tools -------------------------
PY="${AEROKV_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$(command -v "$c")"; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is required (the ROS 2 wheels are cp311); set AEROKV_PYTHON" >&2; exit 1; }
req_hash=$(cat scripts/requirements-ros.txt scripts/requirements-tools.txt | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.aerokv-requirements" 2>/dev/null)" != "$req_hash" ]; then
  log "creating the venv $VENV (ROS 2 jazzy wheels, onnxruntime 1.31.1, model tools; ~1 min)"
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-ros.txt -r scripts/requirements-tools.txt
  rm -f "$VENV/.aerokv-fixups" "$STAMPS/interfaces"
  echo "$req_hash" > "$VENV/.aerokv-requirements"
fi
[ -L .venv ] || [ ! -e .venv ] && ln -sfn "$VENV" .venv

SITE="$VENV/lib/python3.11/site-packages"
# --- 3. Fix-ups of the wheels (docs/design.md §7) ----------------------------------------------
if [ ! -f "$VENV/.aerokv-fixups" ]; then
  log "applying the ROS wheel fix-ups"
  # 1. r2r links -lrmw_implementation; the wheels select Fast DDS statically.
  ln -sf librmw_fastrtps_cpp.so "$VENV/lib/librmw_implementation.so"
  # 2. librcl* list Python helper libraries as NEEDED without using them.
  for lib in "$VENV"/lib/librcl.so "$VENV"/lib/librcl_action.so "$VENV"/lib/librcl_lifecycle.so; do
    [ -f "$lib" ] || continue
    for needed in $(patchelf --print-needed "$lib" | grep rosidl_generator_py || true); do
      patchelf --remove-needed "$needed" "$lib"
    done
  done
  # 3. The wheels' exported cmake files point at the build machine's Python.
  py_inc=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  np_inc=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
  # Nothing left to rewrite is fine (a venv whose requirements changed is fixed up again).
  { grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true; } | while read -r f; do
    sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g" \
           -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/core/include#$np_inc#g" "$f"
  done
  touch "$VENV/.aerokv-fixups"
fi

# --- 4. scripts/env.sh: everything the build and the nodes need -----------------------------
ros_libs=$(ls -d "$SITE"/ros_*.libs 2>/dev/null | tr '\n' ':')
ORT_LIB=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | head -1)
[ -n "$ORT_LIB" ] || { echo "setup: libonnxruntime not found in $SITE/onnxruntime/capi" >&2; exit 1; }
# The interfaces install under a directory named by their hash: AMENT_PREFIX_PATH then changes
# with msg/, srv/ and action/, which is what tells r2r's build script to regenerate its bindings.
iface_hash=$(cat CMakeLists.txt package.xml msg/*.msg srv/*.srv action/*.action | sha256sum | cut -c1-16)
IFACE="$ROOT/build/interfaces/$iface_hash/install"
# px4_msgs (PX4 v1.15's BatteryStatus, interfaces/px4_msgs), for the battery monitor's PX4 source;
# its own package, as on a PX4 machine, and its own hashed prefix for the same reason.
px4_hash=$(cat interfaces/px4_msgs/CMakeLists.txt interfaces/px4_msgs/package.xml interfaces/px4_msgs/msg/*.msg | sha256sum | cut -c1-16)
PX4_MSGS="$ROOT/build/px4_msgs/$px4_hash/install"
cat > scripts/env.sh.tmp <<ENVEOF
# Generated by scripts/setup.sh; source it: \`source scripts/env.sh\`. Do not edit.
export AEROKV_ROOT="$ROOT"
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export AMENT_PREFIX_PATH="$VENV:$IFACE:$PX4_MSGS"
export CMAKE_PREFIX_PATH="$VENV:$IFACE:$PX4_MSGS"
export LD_LIBRARY_PATH="$VENV/lib:${ros_libs}$IFACE/lib:$PX4_MSGS/lib:\${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$IFACE/lib/python3.11/site-packages:$IFACE/local/lib/python3.11/dist-packages:$PX4_MSGS/lib/python3.11/site-packages:$PX4_MSGS/local/lib/python3.11/dist-packages:\${PYTHONPATH:-}"
export ROS_DISTRO=jazzy
export ROS_VERSION=2
export ROS_PYTHON_VERSION=3
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export ROS_LOG_DIR="$ROOT/build/ros-log"
# Network rule: DDS over shared memory only; nothing leaves this machine. Never set
# ROS_AUTOMATIC_DISCOVERY_RANGE to LOCALHOST: it re-opens UDP sockets (docs/design.md §7).
export FASTDDS_BUILTIN_TRANSPORTS=SHM
# The same, as a profile: SHM only, segments large enough for KV snapshots, dead peers' ports
# reclaimed after 50 ms (a killed drone must not stall the others' traffic for a second).
export FASTRTPS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_shm.xml"
export FASTDDS_DEFAULT_PROFILES_FILE="$ROOT/config/fastdds_shm.xml"
unset ROS_AUTOMATIC_DISCOVERY_RANGE
export ROS_DOMAIN_ID="\${ROS_DOMAIN_ID:-0}"
export LIBCLANG_PATH="$(ls -d /usr/lib/llvm-*/lib 2>/dev/null | sort -V | tail -1)"
export IDL_PACKAGE_FILTER="builtin_interfaces;rcl_interfaces;unique_identifier_msgs;action_msgs;service_msgs;type_description_interfaces;std_msgs;sensor_msgs;diagnostic_msgs;geometry_msgs;rosgraph_msgs;aerokv;px4_msgs"
export ORT_DYLIB_PATH="$ORT_LIB"
export AEROKV_MODELS="$ROOT/models/generated"
ENVEOF
if ! cmp -s scripts/env.sh.tmp scripts/env.sh; then mv scripts/env.sh.tmp scripts/env.sh; else rm scripts/env.sh.tmp; fi
# shellcheck disable=SC1091
source scripts/env.sh

# --- 5. This package's interfaces (msg/, srv/, action/) -------------------------------------------
# An interface package: cmake + rosidl from the venv into <build/NAME/HASH/install>, once per hash.
build_interfaces() {  # NAME SOURCE_DIR HASH PREFIX [cmake args...]
  local name=$1 src=$2 hash=$3 prefix=$4; shift 4
  [ "$(cat "$STAMPS/$name" 2>/dev/null)" != "$hash" ] || [ ! -d "$prefix/share" ] || return 0
  log "building $name (cmake + rosidl, ~15 s)"
  rm -rf "build/$name"
  cmake -S "$src" -B "build/$name/$hash/build" -DBUILD_TESTING=OFF "$@" \
        -DCMAKE_INSTALL_PREFIX="$prefix" -DPython3_EXECUTABLE="$VENV/bin/python" \
        -DCMAKE_BUILD_TYPE=Release > "build/$name.log" 2>&1 \
    && cmake --build "build/$name/$hash/build" -j2 >> "build/$name.log" 2>&1 \
    && cmake --install "build/$name/$hash/build" >> "build/$name.log" 2>&1 \
    || { echo "setup: building $name failed; see build/$name.log" >&2; tail -30 "build/$name.log" >&2; exit 1; }
  echo "$hash" > "$STAMPS/$name"
}
build_interfaces interfaces . "$iface_hash" "$IFACE" -DAEROKV_BUILD_RUST=OFF

# --- 5b. px4_msgs (interfaces/px4_msgs): the PX4 battery source of the battery monitor -------
build_interfaces px4_msgs interfaces/px4_msgs "$px4_hash" "$PX4_MSGS"

# --- 6. Model parts (generated, verified against their sha256 manifest) ---------------------
if [ -x models/setup.sh ]; then
  PYTHON="$VENV/bin/python" models/setup.sh
fi

# --- 7. The radio emulator (ns-3 real time, 802.11 ad hoc): aerokv swarm --radio ------------
# Debian's libns3-tap-bridge runs its tap-creator helper from a path inside the package's build
# tree; a private copy of the library points at the helper under build/radio/bin instead.
RADIO="$ROOT/build/radio"
radio_hash=$(cat radio/aerokv_radio.cc /usr/lib/x86_64-linux-gnu/libns3-tap-bridge.so.37 | sha256sum | cut -c1-16)
if [ "$(cat "$STAMPS/radio" 2>/dev/null)" != "$radio_hash" ] || [ ! -x "$RADIO/bin/aerokv_radio" ]; then
  log "building the radio emulator (ns-3 $(dpkg-query -W -f='${Version}' libns3-dev), ~1 min)"
  mkdir -p "$RADIO/bin" "$RADIO/lib"
  cp /usr/libexec/ns3/ns3.37-tap-creator "$RADIO/bin/"
  python3 - /usr/lib/x86_64-linux-gnu/libns3-tap-bridge.so.37 "$RADIO/bin/ns3.37-tap-creator" \
      "$RADIO/lib/libns3-tap-bridge.so.37" <<'PY'
import re, sys
lib, helper, out = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
data = open(lib, "rb").read()
found = re.findall(rb"/[^\0]*/ns3\.37-tap-creator\0", data)
if len(found) != 1:
    sys.exit(f"setup: expected one tap-creator path in {lib}, found {len(found)}")
old = found[0]
if len(helper) + 1 > len(old):
    sys.exit(f"setup: {helper.decode()} is longer than {old[:-1].decode()}: use a shorter checkout path")
open(out, "wb").write(data.replace(old, helper + b"\0" * (len(old) - len(helper))))
PY
  g++ -O2 -std=c++17 -o "$RADIO/bin/aerokv_radio" radio/aerokv_radio.cc \
      -L"$RADIO/lib" -Wl,-rpath,"$RADIO/lib" -lns3-tap-bridge -lns3-wifi -lns3-mobility -lns3-propagation \
      -lns3-network -lns3-core > build/radio.log 2>&1 \
    || { echo "setup: building the radio emulator failed; see build/radio.log" >&2; tail -30 build/radio.log >&2; exit 1; }
  echo "$radio_hash" > "$STAMPS/radio"
fi

log "ready in $((SECONDS - t0)) s (source scripts/env.sh to use the environment)"
