#!/usr/bin/env bash
# One prepared device check for a session lent a GPU machine (docs/benchmarks.md, "GPU"):
# the GPU-marked tests, then the kernel suite on the GPU with JAX as the peer where it is
# installed, every output under $OUT (the device tool brings that folder back).
#
#   OUT=/tmp/gpu scripts/gpu_check.sh                 # on the GPU machine (its own Python)
#   DEVICE=cpu SIZE=tiny OUT=/tmp/gpu scripts/gpu_check.sh   # a smoke run anywhere
#
# The machine has no network: it uses the Python that has torch (PY, else the first of
# /opt/torch/.venv/bin/python and python3) and this checkout on PYTHONPATH, installing
# nothing. Each step has its own time limit, so one that hangs still leaves the others'
# results; the whole stays under about 9 minutes (TESTS_S + BENCH_S + BENCH64_S).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-full}
TESTS_S=${TESTS_S:-150}
BENCH_S=${BENCH_S:-240}
BENCH64_S=${BENCH64_S:-120}
if [ -z "${PY:-}" ]; then
    if [ -x /opt/torch/.venv/bin/python ]; then PY=/opt/torch/.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DISTJAC_CACHE_DIR="$OUT/cache"

{
    date -u
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("ray", "pyarrow", "numpy", "jax", "tensorflow"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - what is missing is what we want to know
        print(name, "missing:", type(err).__name__)
EOF
} > "$OUT/machine.txt" 2>&1

timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: rc=$?" >> "$OUT/summary.txt"

peer=()
if "$PY" -c "import jax" 2>/dev/null; then peer=(--peer-python "$PY"); else peer=(--no-peers); fi
timeout "$BENCH_S" "$PY" -m distjac.cli bench kernels --device "$DEVICE" --size "$SIZE" --no-plots \
    "${peer[@]}" --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
echo "kernels (suite batch): rc=$?" >> "$OUT/summary.txt"
timeout "$BENCH64_S" "$PY" -m distjac.cli bench kernels --device "$DEVICE" --size "$SIZE" --no-plots \
    "${peer[@]}" --batch 64 --out "$OUT/kernels_b64" > "$OUT/kernels_b64.log" 2>&1
echo "kernels (64 rows): rc=$?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
