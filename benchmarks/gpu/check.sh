#!/usr/bin/env bash
# The GPU check of the GPU-tier issue, on a fresh GPU machine with no package index, from the
# repository root. See README.md beside this file.
#
#   bash benchmarks/gpu/check.sh tests   # CUDA tests (kernels, device cache, exactness on cuda)
#   bash benchmarks/gpu/check.sh bench   # damo-hybrid bench --gpu, JSON and profiler traces
#   bash benchmarks/gpu/check.sh all     # both (may not fit one 10-minute call)
#
# Everything it writes goes to $OUT (default ./gpu_out): logs, gpu_tier.json, traces.tar.gz.
# Extra arguments after the mode go to `bench --gpu` (e.g. --gpu-steps 20 --models deepfm).
set -uo pipefail
mode=${1:-all}
shift || true
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"

# rocksdict is the one dependency the machine lacks: its wheel travels in .whl/ (see README.md)
if ! python3 -c "import rocksdict" 2>/dev/null; then
    ls .whl/rocksdict-*.whl >/dev/null 2>&1 || { echo "no .whl/rocksdict-*.whl: download it first (README.md)" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 - <<'PY'
import numba, numpy, rocksdict, torch
try:
    import cupy
    cp = cupy.__version__
except Exception as e:  # reported, and the CUDA tests will say they skip
    cp = f"missing ({e})"
from damo_hybrid.ops import cuda_available
print(f"python torch {torch.__version__} cuda {torch.version.cuda} cupy {cp} numpy {numpy.__version__} "
      f"numba {numba.__version__} rocksdict {getattr(rocksdict, '__version__', '?')} damo_hybrid cuda_available={cuda_available()}")
PY
} 2>&1 | tee "$OUT/env.txt"

rc=0
if [ "$mode" = tests ] || [ "$mode" = all ]; then
    # every requires_cuda test: the kernels against their CPU twins, the device cache, and the
    # pipelined run on cuda against the sequential CPU reference; -rs lists any skip with its reason
    timeout 420 python3 -m pytest -q -rs -m requires_cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log"
    rc=${PIPESTATUS[0]}
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
    rm -rf /tmp/damo-traces && mkdir -p /tmp/damo-traces
    timeout 540 python3 -m damo_hybrid.cli bench --gpu --json "$OUT/gpu_tier.json" --trace-dir /tmp/damo-traces "$@" \
        2>&1 | tee "$OUT/bench_gpu.log"
    b=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && rc=$b
    tar -czf "$OUT/traces.tar.gz" -C /tmp damo-traces 2>/dev/null
fi
exit "$rc"
