#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build, GPU tests, benchmarks, results.
#   scripts/gpu_check.sh [OUTDIR]      (default OUTDIR: gpu_results)
# Writes into OUTDIR exactly 8 files (the device tool brings back at most 8, so a run command
# that adds a file of its own to $OUT loses one of these): summary.txt (machine, versions,
# results), build.log, tests.log, bench.log, mcs_cuda.json, fused_layers_cuda.json,
# models_cuda_bfloat16.json (eager variants) and models_cuda_compiled.json (torch.compile
# variants). The model files are rewritten after every measurement, so a run cut short keeps
# what it measured.
# Sized to finish in about 8 minutes on one H100: every step has its own time limit and all of
# them share one deadline (GPU_CHECK_BUDGET_S, default 480 s), so a slow step shortens the
# later ones instead of overrunning the whole check. Order (times from the H100 run of
# 2026-11-27): build (95 s), the kernel and eager model benchmarks (140 s together), the GPU
# tests (about 200 s with 8 xdist workers for 491 tests; 624 since 2026-11-27 evening, of
# which 8 workers ran 497 in 214 s on an H200; capped at 280 s), the MCSConv kernels as
# CUDA-graph replays (at most 60 s), the compiled models with what is left but 80 s, an
# inference kernel profile (at most 45 s, keeping 50), then an Nsight Compute profile of the
# MCSConv kernels when ncu is there. At the default budget the tests end near 480 s, so the
# compiled models need the second call below (about 230 s: 20 s rebuild, 190 s for four
# compiled variants; reference-compiled has never finished compiling inside any budget).
# With every step present the later ones may get little time (the steps' caps add up to more
# than the budget). GPU_CHECK_SKIP="mcs fused eager tests graphs compiled profile ncu" (any of them)
# leaves steps out, e.g. for a second call that times only the compiled models:
#   GPU_CHECK_SKIP="mcs fused eager tests graphs profile ncu" scripts/gpu_check.sh $OUT
# or one that gives the CUDA-graph MCSConv timings ("graphs": device time without the host's
# per-call costs) and Nsight Compute the time they never had (benchmarks/profile_mcs_kernels.py
# profiles the weight gradient first):
#   GPU_CHECK_SKIP="mcs fused eager tests compiled profile" scripts/gpu_check.sh $OUT
# GPU_CHECK_COMPILED_VARIANTS replaces that step's variant list, e.g. "reference
# reference-compiled" with GPU_CHECK_BUDGET_S=520 to give the compiled reference (never timed:
# its compile outlasted every budget so far) the whole call; each step's warm-up (compile) time
# is printed and lands in the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_results}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import the package from here
BUDGET=${GPU_CHECK_BUDGET_S:-480}
status=0
SKIP=" ${GPU_CHECK_SKIP:-} "
# wanted KEY: whether the step KEY is not in GPU_CHECK_SKIP (noted in the summary when it is).
wanted() { if [[ "$SKIP" == *" $1 "* ]]; then note "(skipped: $1, GPU_CHECK_SKIP)"; return 1; fi; }
note() { echo "$*" | tee -a "$OUTDIR/summary.txt"; }
# Seconds a step may take: its own cap, or what is left of the budget if that is less.
limit() { local left=$((BUDGET - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }
# The same, leaving $1 seconds of the budget for the steps after: limit_keeping RESERVE CAP.
limit_keeping() { local left=$((BUDGET - SECONDS - $1)); [ "$left" -lt "$2" ] && echo $((left > 5 ? left : 5)) || echo "$2"; }
: > "$OUTDIR/summary.txt"
touch "$OUTDIR/bench.log"  # the steps append to it; read at the end even if all were skipped
# step NAME SECONDS COMMAND...: run a step under its time limit. SIGINT first, so that pytest
# still prints its summary and a benchmark its traceback; KILL 20 s later. A failure or a stop
# at the limit is noted in the summary by name (not only in the final exit status).
step() {
  local name=$1 secs=$2 rc; shift 2
  timeout -s INT -k 20 "$secs" "$@"; rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "$name: stopped at its time limit (${secs} s)"; status=1
  elif [ "$rc" -ne 0 ]; then
    note "$name: exit status $rc"; status=1
  fi
  return "$rc"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
} >> "$OUTDIR/summary.txt" 2>&1

note "== build (CUDA kernels for sm_90 only, to keep the build short)"
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-16} \
    timeout "$(limit 180)" "$PY" -m pip install -v -e . --no-build-isolation --no-deps \
    > "$OUTDIR/build.log" 2>&1; then
  note "BUILD FAILED (see build.log)"; status=1
fi
note "build done at ${SECONDS} s"
"$PY" -m sficonv_ext.info 2>&1 | tee -a "$OUTDIR/summary.txt"
# The toolchain, and whether the extension holds its own copy of libstdc++'s stream code (its
# numbered error messages crashed on 2026-11-28; sficonv_ext/ops/cxx_runtime.py). build.log
# (pip -v) has the link command.
{
  echo "c++: $(c++ --version 2>&1 | head -1); libstdc++.so for it: $(c++ -print-file-name=libstdc++.so 2>&1)"
  so=$(ls sficonv_ext/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && command -v nm > /dev/null && echo "std::ostream symbols defined in $so: $(nm -D --defined-only "$so" | grep -c ' _ZNSo')"
  grep -E " -shared " "$OUTDIR/build.log" | grep -E "(c|g)\+\+ " | tail -1 | sed 's# [^ ]*\.o\b##g' | cut -c1-800
} 2>&1 | tee -a "$OUTDIR/summary.txt"

note "== MCSConv kernel benchmark"
# Two interleaved rounds of 30 calls (about the 50 calls of one round before): a kernel's time
# is the median of its rounds, the copy's the best round.
wanted mcs && step "MCSConv benchmark" "$(limit 90)" "$PY" benchmarks/bench_mcs.py \
    --device cuda --iters 30 --rounds 2 --warmup 10 --json "$OUTDIR/mcs_cuda.json" \
    >> "$OUTDIR/bench.log" 2>&1
note "== fused-layer benchmark (first layer, BatchNorm+add+ReLU epilogue)"
wanted fused && step "fused-layer benchmark" "$(limit 45)" "$PY" benchmarks/bench_fused_layers.py \
    --device cuda --iters 25 --rounds 2 --json "$OUTDIR/fused_layers_cuda.json" \
    >> "$OUTDIR/bench.log" 2>&1
note "== model benchmark (bfloat16, batch 64): eager variants, then compiled ones"
# fused-inference* are fuse_for_inference with plain F.conv2d calls (cudnn=False); the last two
# are its CUDA default (weights cast once; cuDNN's fused convolution + bias + add + ReLU).
# --cudnn-benchmark: cuDNN's autotuned algorithms for every variant, as sficonv train runs
# (the 2026-11-26 runs used its heuristics).
wanted eager && step "eager model benchmark" "$(limit 150)" "$PY" benchmarks/bench_models.py --device cuda \
    --batch 64 --dtype bfloat16 --iters 10 --warmup 3 --rounds 2 --cudnn-benchmark \
    --json "$OUTDIR/models_cuda_bfloat16.json" \
    --variants reference reference-amp-cl fast plain fused-inference fused-inference-cudagraph \
    fused-inference-lowp fused-inference-cudnn fused-inference-cudnn-cudagraph \
    >> "$OUTDIR/bench.log" 2>&1
# The tests that raise errors, alone and first: on 2026-11-27 and -28 (H100, H200) every error
# message of the extension with a number in it crashed its process (segfault): the build there
# held a private copy of libstdc++'s stream code (scripts/cuda_error_probe.py found it on
# 2026-11-28; setup.py now links the loaded libstdc++ first, untried on a GPU machine;
# test_cxx_runtime.py checks the build). Run serially with faulthandler, so a crash is named
# in the summary with its Python traceback in bench.log rather than lost with an xdist worker.
# (Not under gdb: the GPU machines have none, and gdb's exit status is not the tests'.)
if wanted tests; then
  note "== the error tests, alone (segfaulted on 2026-11-27 and -28)"
  marker="== error tests $(date +%s)"  # bench.log may hold an older run's
  echo "$marker" >> "$OUTDIR/bench.log"
  step "CUDA error tests" "$(limit 60)" "$PY" -X faulthandler -m pytest \
      python_tests/test_gpu_mcs.py python_tests/test_cuda_kernel_config.py \
      python_tests/test_cxx_runtime.py -q -p no:cacheprovider \
      -k "more_channels_than_a_grid or register_cap or bad_kernel_choice or kernel_config or cxx_runtime" \
      >> "$OUTDIR/bench.log" 2>&1
  sed -n "/^$marker\$/,\$p" "$OUTDIR/bench.log" \
      | grep -E "Segmentation|Fatal Python|passed|failed|^FAILED" | head -30 \
      | tee -a "$OUTDIR/summary.txt"
  # If they failed: which kinds of error crash, each in a process of its own, with the native
  # stack in bench.log (the probe that found the private libstdc++ copy on 2026-11-28).
  if grep -q "CUDA error tests:" "$OUTDIR/summary.txt"; then
    echo "== cuda_error_probe" >> "$OUTDIR/bench.log"
    step "CUDA error probe" "$(limit 60)" "$PY" scripts/cuda_error_probe.py --maps \
        >> "$OUTDIR/bench.log" 2>&1
    sed -n '/^== cuda_error_probe$/,$p' "$OUTDIR/bench.log" | grep -E "^[a-z].*: |crashed or failed$" \
        | cut -c1-200 | tee -a "$OUTDIR/summary.txt"
  fi
fi
note "== GPU tests"
# Parallel workers when pytest-xdist is installed, one per core up to 16: Triton compiles
# dominate the test time (8 workers on the H200's 16 cores reached 497 of 624 tests in 214 s,
# 2026-11-28). Without xdist the tests run one by one and may not finish in their time (noted).
WORKERS=$(nproc 2>/dev/null || echo 8); [ "$WORKERS" -gt 16 ] && WORKERS=16
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n $WORKERS" || echo "")
note "pytest-xdist: ${XDIST:-not installed, tests run serially}"
# SFICONV_REQUIRE_*: a build whose CUDA kernels did not load fails here instead of skipping.
# The files the 2026-11-28 run never reached come first (xdist hands tests out in this order):
# the fused first layer's layout fix and the Triton epilogue have not run on a GPU since.
wanted tests && SFICONV_REQUIRE_EXTENSION=1 SFICONV_REQUIRE_CUDA=1 \
step "GPU tests" "$(limit 280)" "$PY" -m pytest python_tests/test_first_layer.py \
    python_tests/test_norm_act.py python_tests/test_mcs_triton.py \
    python_tests/test_cuda_kernel_config.py python_tests/test_cxx_runtime.py \
    python_tests/test_gpu_models.py python_tests/test_gpu_cudnn_inference.py \
    python_tests/test_gpu_mcs.py \
    -q -p no:cacheprovider $XDIST -rfEpP > "$OUTDIR/tests.log" 2>&1
if [ -f "$OUTDIR/tests.log" ]; then
  grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -20 | tee -a "$OUTDIR/summary.txt"
  # The half-precision model tests print their errors against float32, the cuDNN inference
  # tests how many convolutions cuDNN had no fused engine for (-rP keeps both).
  grep -E "against float32|found no cuDNN engine" "$OUTDIR/tests.log" | sort | uniq | head -30 \
      >> "$OUTDIR/summary.txt"
  # -rp lists every passed test: a run cut at its limit says which tests it never reached
  # (476 collected at a86e189, 491 at 64644d4, about 620 since; a86e189's 190 s cap left 10
  # unrun, names unknown).
  note "passed tests listed in tests.log: $(grep -c '^PASSED' "$OUTDIR/tests.log")"
  tail -2 "$OUTDIR/tests.log" | tee -a "$OUTDIR/summary.txt"
fi
note "tests done at ${SECONDS} s"

# The MCSConv kernels again as CUDA-graph replays: the device's time alone, without the host's
# per-call costs (Python autograd, dispatch, launches), which an eager call of this size may be
# mostly made of; issue 3's bandwidth target is about the kernels. After the tests, so that it
# takes only what they leave (or a call of its own, see the top). Table into bench.log and the
# summary; its JSON outside OUTDIR (the 8-file limit).
note "== MCSConv kernel benchmark, CUDA-graph replays (device time only)"
if [ $((BUDGET - SECONDS)) -lt 40 ]; then
  note "not run: under 40 s of the budget left (a call of its own: see the top)"
else
  wanted graphs && step "MCSConv benchmark, CUDA graphs" "$(limit 60)" "$PY" \
      benchmarks/bench_mcs.py --device cuda --cuda-graph --backends torch cuda triton \
      --iters 30 --rounds 2 --warmup 5 --json "$(mktemp -d)/mcs_cuda_graph.json" \
      >> "$OUTDIR/bench.log" 2>&1
fi

# The compiled variants with the eager float32 reference in the same process (ratios within one
# run). fused-inference-compiled first (inference only, the quickest compile): it is the best
# hope for the 4x inference target, which fast-compiled missed at 3.69x, and no run has timed
# it yet. reference-compiled last: its compile has never finished inside the budget so far.
# Before the inference profile and the Nsight Compute step, which keep 30 and 50 s: these
# numbers are issue 4's targets.
note "== compiled models (bfloat16, batch 64)"
cmarker="== compiled models $(date +%s)"
echo "$cmarker" >> "$OUTDIR/bench.log"
wanted compiled && step "compiled model benchmark" "$(limit_keeping 80 400)" "$PY" benchmarks/bench_models.py \
    --device cuda --batch 64 --dtype bfloat16 --iters 10 --warmup 3 --rounds 2 --cudnn-benchmark \
    --json "$OUTDIR/models_cuda_compiled.json" \
    --variants ${GPU_CHECK_COMPILED_VARIANTS:-reference fused-inference-compiled fast-compiled plain-compiled reference-compiled} \
    >> "$OUTDIR/bench.log" 2>&1
# Each compiled step's warm-up: its compile time, or how long it ran before the limit cut it.
[[ "$SKIP" != *" compiled "* ]] && sed -n "/^$cmarker\$/,\$p" "$OUTDIR/bench.log" | grep -E "warm-up (took|stopped)" \
    | tee -a "$OUTDIR/summary.txt"

# Why eager fuse_for_inference ran slower than the unfolded model on the H100: kernels per
# forward and the costliest kernels of each inference variant, into bench.log and the summary.
note "== inference kernel profile (bfloat16, batch 64)"
wanted profile && step "inference profile" "$(limit_keeping 50 45)" "$PY" benchmarks/profile_inference.py \
    --batch 64 --dtype bfloat16 >> "$OUTDIR/bench.log" 2>&1
grep -E "^== inference kernel|^profile |^ +[0-9.]+ ms +[0-9.]+%" "$OUTDIR/bench.log" \
    | head -60 >> "$OUTDIR/summary.txt"

# Why the MCSConv kernels are as fast as they are (issue 3's bandwidth target): Nsight Compute
# on one call of each, into bench.log (no file of its own: the 8-file limit), key lines into
# the summary. Skipped where the machine has no ncu or denies it the GPU counters.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ] && wanted ncu; then
  note "== Nsight Compute profile of the MCSConv kernels (bench.log)"
  echo "== ncu: benchmarks/profile_mcs_kernels.py" >> "$OUTDIR/bench.log"
  timeout "$(limit 240)" "$NCU" --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --kernel-name "regex:(conv|grad|backward|taps|mcs)" \
      --launch-count 32 "$PY" benchmarks/profile_mcs_kernels.py >> "$OUTDIR/bench.log" 2>&1 \
      || note "ncu did not finish (see bench.log)"
  sed -n '/== ncu: /,$p' "$OUTDIR/bench.log" | grep -E "^== phase|^  [a-z_0-9]+.*\(|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per Thread|ERR_NVGPUCTRPERM" \
      | head -120 >> "$OUTDIR/summary.txt"
else
  note "no ncu on this machine: kernel profile skipped"
fi

grep -vE "^(W[0-9]|  warnings|$)|warm-up" "$OUTDIR/bench.log" | grep -E "^ *[0-9]+x|^ *(bfloat16|float32)|^(MCSConv|Fused|SFIConv|variant|reference|fast|plain|fused)|^ +(first|bn)|FAILED|built" \
    | tee -a "$OUTDIR/summary.txt"
note "finished at ${SECONDS} s, exit status $status"
exit $status
