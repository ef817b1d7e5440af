#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build, GPU tests, benchmarks, results.
#   scripts/gpu_check.sh [OUTDIR]      (default OUTDIR: gpu_results)
# Writes into OUTDIR: env.txt, build.log, tests.log, bench_models.log, models_cuda_*.json,
# summary.txt. Sized to finish in about 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
} > "$OUTDIR/env.txt" 2>&1

echo "== build" | tee "$OUTDIR/summary.txt"
if ! timeout 240 "$PY" -m pip install -e . --no-build-isolation --no-deps > "$OUTDIR/build.log" 2>&1; then
  echo "BUILD FAILED (see build.log)" | tee -a "$OUTDIR/summary.txt"; status=1
fi

echo "== tests" | tee -a "$OUTDIR/summary.txt"
timeout 180 "$PY" -m pytest python_tests -q -x -k "gpu or cuda" > "$OUTDIR/tests.log" 2>&1 || status=1
tail -3 "$OUTDIR/tests.log" | tee -a "$OUTDIR/summary.txt"

echo "== model benchmarks" | tee -a "$OUTDIR/summary.txt"
for dtype in bfloat16 float32; do
  timeout 150 "$PY" benchmarks/bench_models.py --device cuda --batch 64 --dtype "$dtype" \
      --iters 10 --warmup 3 --json "$OUTDIR/models_cuda_${dtype}.json" \
      >> "$OUTDIR/bench_models.log" 2>&1 || status=1
done
grep -A7 "^SFIConv-ResNet" "$OUTDIR/bench_models.log" | tee -a "$OUTDIR/summary.txt"
echo "exit status $status" | tee -a "$OUTDIR/summary.txt"
exit $status
