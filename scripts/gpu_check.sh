#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build, GPU tests, benchmarks, results.
#   scripts/gpu_check.sh [OUTDIR]      (default OUTDIR: gpu_results)
# Writes into OUTDIR (8 files): env.txt, build.log, tests.log, bench.log, mcs_cuda.json,
# models_cuda_bfloat16.json, models_cuda_float32.json, summary.txt.
# Sized to finish in about 8 minutes on one H100; every step has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
note() { echo "$*" | tee -a "$OUTDIR/summary.txt"; }
: > "$OUTDIR/summary.txt"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
} > "$OUTDIR/env.txt" 2>&1

note "== build (CUDA kernels for sm_90 only, to keep the build short)"
start=$SECONDS
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-16} \
    timeout 300 "$PY" -m pip install -e . --no-build-isolation --no-deps > "$OUTDIR/build.log" 2>&1; then
  note "BUILD FAILED (see build.log)"; status=1
fi
note "build took $((SECONDS - start)) s"
"$PY" -m sficonv_ext.info 2>&1 | tee -a "$OUTDIR/summary.txt"

note "== GPU tests"
timeout 240 "$PY" -m pytest python_tests/test_gpu_mcs.py python_tests/test_gpu_models.py \
    python_tests/test_mcs_triton.py -q -x > "$OUTDIR/tests.log" 2>&1 || status=1
tail -4 "$OUTDIR/tests.log" | tee -a "$OUTDIR/summary.txt"

note "== MCSConv kernel benchmark"
timeout 120 "$PY" benchmarks/bench_mcs.py --device cuda --json "$OUTDIR/mcs_cuda.json" \
    >> "$OUTDIR/bench.log" 2>&1 || status=1
note "== model benchmarks"
for dtype in bfloat16 float32; do
  timeout 120 "$PY" benchmarks/bench_models.py --device cuda --batch 64 --dtype "$dtype" \
      --iters 10 --warmup 3 --json "$OUTDIR/models_cuda_${dtype}.json" \
      >> "$OUTDIR/bench.log" 2>&1 || status=1
done
grep -E "^ +[0-9]+x|^MCSConv|^SFIConv|^variant|^reference|^fast" "$OUTDIR/bench.log" \
    | tee -a "$OUTDIR/summary.txt"
note "exit status $status"
exit $status
