#!/usr/bin/env bash
# The GPU benchmark suite in one call (rows, budget and output: benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh [--dry_run] [more gpu_suite.py options]
#
# 1. Checks the Python packages reid_jax imports that a bare GPU image may lack. If some
#    are missing and a .whl/ folder exists in the repo root, installs its wheels (no
#    index, no dependencies resolved, only distributions not already installed, so the
#    machine's jax/torch/numpy are never shadowed) into /tmp/site. Whatever is still
#    missing is named in one line with the command that fetches the wheels.
# 2. Runs benchmarks/gpu_suite.py with the time left of SUITE_LIMIT_S (default 470 s, the
#    8-minute limit less a margin); it writes the table to stdout and to $OUT/gpu_suite.md
#    ($OUT set) or ./gpu_suite.md.
# --dry_run installs nothing (a CPU check of the whole suite on tiny inputs).
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
LIMIT_S="${SUITE_LIMIT_S:-470}"
DRY=0
for arg in "$@"; do [ "$arg" = "--dry_run" ] && DRY=1; done

# import name:pip distribution. ml_collections is needed for real (configs); the others
# only feed the input pipeline, which no timed step runs: gpu_suite.py stubs them if absent.
PKGS="${GPU_SUITE_PKGS:-ml_collections:ml-collections tensorflow_datasets:tensorflow-datasets array_record:array-record grain:grain}"

missing() {
  "$PY" - $PKGS <<'EOF'
import importlib.util, sys
print(" ".join(p for p in sys.argv[1:] if importlib.util.find_spec(p.split(":")[0]) is None))
EOF
}

MISSING=$(missing)
if [ -n "$MISSING" ] && [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  WHEELS=$("$PY" - <<'EOF'
import glob, importlib.metadata, os
for w in sorted(glob.glob(".whl/*.whl")):
    dist = os.path.basename(w).split("-")[0]  # {distribution}-{version}-...whl
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        print(w)
EOF
)
  if [ -n "$WHEELS" ]; then
    echo "# installing $(echo "$WHEELS" | wc -l) wheel(s) from .whl/ into /tmp/site" >&2
    # shellcheck disable=SC2086
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps \
      --target /tmp/site $WHEELS >&2
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
  NAMES=$(for p in $MISSING; do printf '%s ' "${p%%:*}"; done)
  DISTS=$(for p in $MISSING; do printf '%s ' "${p##*:}"; done)
  if [ -d .whl ]; then WHERE="not provided by .whl/"; else WHERE="no .whl/ folder"; fi
  # --no-deps: tensorflow-datasets' own closure includes sdist-only packages (promise),
  # and none of it is needed here (a data library that does not import is stubbed).
  echo "missing Python packages: ${NAMES}(${WHERE}; only ml_collections is required)." \
       "Fetch the wheels where there is internet, in the repo root: python3 -m pip" \
       "download -d .whl --no-deps --only-binary=:all: --python-version 3.12" \
       "--implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform" \
       "manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 ${DISTS}" >&2
  case " $NAMES" in
    *" ml_collections "*) echo "ml_collections is required (configs/); stopping." >&2; exit 1 ;;
  esac
  echo "# going on: the missing input-pipeline modules are stubbed (no timed step uses them)" >&2
fi

ELAPSED=$(( $(date +%s) - START ))
BUDGET=$(( LIMIT_S - ELAPSED - 20 ))  # 20 s: start-up, nvidia-smi, the report
export GPU_SUITE_COMMAND="bash benchmarks/gpu_suite.sh $*"
if [ "$DRY" = 0 ]; then
  exec "$PY" benchmarks/gpu_suite.py --budget_s="$BUDGET" "$@"
fi
exec "$PY" benchmarks/gpu_suite.py "$@"
