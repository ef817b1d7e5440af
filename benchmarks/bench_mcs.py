"""MCSConv kernel benchmark: every available backend against the pure-PyTorch path.

For each shape and dtype: forward, backward (x only) and backward (x and weight) of the learnable
(constrained) MCSConv, k=5, and forward_backward (the sum of forward and backward x+w: one
training step of the op). Reports median time, GB/s against the minimum bytes (forward: read x,
write y; backward x: read grad, write grad_x; backward x+w: also read x), that as a percent of
the copy bandwidth measured in the same run, and the speedup over the PyTorch path. Prints a table
and writes JSON.

With ``--cuda-graph`` (CUDA) each call is captured once in a CUDA graph and replayed: the times
are then the device's alone, without the Python, dispatch and launch costs the host adds to an
eager call (which a small op's eager time can be mostly made of). Phases there: forward, and
forward_backward captured whole (a backward is captured with its forward: autograd runs each
backward op on its forward's stream).

    python benchmarks/bench_mcs.py                    # CPU: [8, 64, 64, 64] float32
    python benchmarks/bench_mcs.py --device cuda      # [64,64,64,64] and [32,64,128,128]
    python benchmarks/bench_mcs.py --device cuda --cuda-graph --backends torch cuda
"""
import argparse
import contextlib
import os
import statistics
import time

import torch

from sficonv_ext import ops

from bench_common import (MALLOC_CHOICES, MALLOC_HELP, machine_info, result_path, set_malloc,
                          warn_if_loaded, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHAPES = {"cpu": ["8x64x64x64"], "cuda": ["64x64x64x64", "32x64x128x128"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", help="NxCxHxW (default depends on the device)")
    p.add_argument("--dtypes", nargs="*", default=None,
                   help="default: float32 on CPU, float32 and bfloat16 on CUDA")
    p.add_argument("--layouts", nargs="*", default=["nchw", "channels_last"],
                   choices=["nchw", "channels_last"])
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds in which the copy and every backend take turns: a kernel's "
                        "time is the median of its rounds' medians, the copy's the best round")
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    p.add_argument("--backends", nargs="*", default=None,
                   help="only these of the available backends (default: all; torch, the "
                        "baseline of the speedup column, is always measured)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays: device time only (see the module notes)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def timer(device):
    """Median seconds per call. On CUDA every call sits between its own pair of events, and all
    calls are queued back to back before one synchronisation, so the GPU never idles waiting for
    the host (which would add launch latency to every kernel, and lets clocks sag)."""
    def measure(fn, warmup, iters):
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return measure


def graph_timer(device):
    """Like ``timer``, for ``fn`` captured once in a CUDA graph: median seconds per replay, each
    between its own pair of events. The warm-up runs eagerly on a side stream first (Triton
    compiles, cuDNN picks its algorithms, the caching allocator fills), as capture requires."""
    def measure(fn, warmup, iters):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 2)):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(warmup):
            graph.replay()
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)
    return measure


def backends_for(device, chosen=None):
    """The backends measured: those available (and in ``chosen``, when given), torch first."""
    names = _available_backends(device)
    return [b for b in names if chosen is None or b == "torch" or b in chosen]


def _available_backends(device):
    info = ops.backends()
    names = ["torch"]
    if device.type == "cpu" and info["cpp"]:
        names.append("cpp")
    if device.type == "cuda":
        if info["cuda"]:
            names += list(CUDA_VARIANTS)
        if info["triton_ops"]:
            names.append("triton")
    return names


# The CUDA extension's kernel choices timed side by side on one build (environment read on every
# call): the default (the double-buffered tiles, csrc/mcs_conv_cuda_tiles_pipelined.cuh, for
# NCHW k = 3, 5, 7); "cuda-tiles", the plain tile kernel it replaced; "cuda-rows", the
# row-blocked NCHW kernels before that; "cuda-tile-mb3"/"-mb4", the plain tile kernel built for
# 3 or 4 resident blocks per SM (fewer registers, see tile_min_blocks in csrc/mcs_conv_cuda.cu).
CUDA_VARIANTS = {"cuda": {}, "cuda-tiles": {"SFICONV_CUDA_NCHW_KERNEL": "tiles"},
                 "cuda-rows": {"SFICONV_CUDA_NCHW_KERNEL": "rows"},
                 "cuda-tile-mb3": {"SFICONV_CUDA_TILE_MIN_BLOCKS": "3"},
                 "cuda-tile-mb4": {"SFICONV_CUDA_TILE_MIN_BLOCKS": "4"}}
CUDA_KERNEL_ENV = ("SFICONV_CUDA_NCHW_KERNEL", "SFICONV_CUDA_FUSED_BACKWARD",
                   "SFICONV_CUDA_TILE_MIN_BLOCKS")


@contextlib.contextmanager
def cuda_kernel_choice(settings):
    """The CUDA extension's kernel choice while measuring (whatever the caller's environment
    says), restored afterwards."""
    previous = {name: os.environ.get(name) for name in CUDA_KERNEL_ENV}
    for name in CUDA_KERNEL_ENV:
        os.environ.pop(name, None)
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bench_case(shape, dtype, layout, k, device, backend, measure, args, phases=None):
    if phases is None:
        phases = (("forward", "forward_backward") if getattr(args, "cuda_graph", False)
                  else ("forward", "backward_x", "backward_xw"))
    if backend in CUDA_VARIANTS:
        if backend != "cuda" and (layout != "nchw" or k not in (3, 5, 7)):
            return {}  # the only inputs where the choices differ
        with cuda_kernel_choice(CUDA_VARIANTS[backend]):
            return _measure_case(shape, dtype, layout, k, device, "cuda", measure, args, phases)
    return _measure_case(shape, dtype, layout, k, device, backend, measure, args, phases)


def _measure_case(shape, dtype, layout, k, device, backend, measure, args, phases):
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(shape[1], 1, k, k, device=device) + 0.5).to(dtype)
    g = torch.randn_like(x)
    out = {}
    if "forward" in phases:
        with torch.no_grad():
            out["forward"] = measure(lambda: ops.mcs_conv(x, w, backend=backend), args.warmup,
                                     args.iters)
    for name, need_w in (("backward_x", False), ("backward_xw", True)):
        if name not in phases:
            continue
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_(need_w)
        y = ops.mcs_conv(xr, wr, backend=backend)
        inputs = (xr, wr) if need_w else (xr,)
        out[name] = measure(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True),
                            args.warmup, args.iters)
    if "forward_backward" in phases:  # measured whole (the CUDA-graph mode)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out["forward_backward"] = measure(
            lambda: torch.autograd.grad(ops.mcs_conv(xr, wr, backend=backend), (xr, wr), g),
            args.warmup, args.iters)
    return out


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        run(args)


def measure_group(shape, dtype, layout, device, measure, args):
    """``(copy seconds per round, {backend: {phase: [seconds per round]}})`` for one shape,
    dtype and layout: the copy and the backends take turns round by round, so a slow spell of a
    shared machine hits them alike instead of one backend's block."""
    src = torch.randn(shape, device=device).to(dtype)
    dst = torch.empty_like(src)
    copies, samples = [], {}
    for _ in range(args.rounds):
        copies.append(measure(lambda: dst.copy_(src), args.warmup, args.iters))
        for backend in backends_for(device, args.backends):
            times = bench_case(shape, dtype, layout, args.kernel_size, device, backend, measure,
                               args)
            for phase, seconds in times.items():
                samples.setdefault(backend, {}).setdefault(phase, []).append(seconds)
    return copies, samples


def _group_rows(shape_text, shape, dtype_name, layout, copy_s, samples):
    """The table rows of one shape, dtype and layout, against a copy taking ``copy_s``."""
    numel = torch.Size(shape).numel()
    bytes_per = torch.finfo(DTYPES[dtype_name]).bits // 8
    copy_gbs = 2 * numel * bytes_per / copy_s / 1e9
    rows = []
    min_bytes = {"forward": 2, "backward_x": 2, "backward_xw": 3, "forward_backward": 5}
    results = {}
    for backend, phases in samples.items():
        results[backend] = {phase: statistics.median(v) for phase, v in phases.items()}
        # The training figure: one forward and one backward, learnable weight (measured
        # whole in the CUDA-graph mode).
        if "forward" in phases and "backward_xw" in phases:
            results[backend]["forward_backward"] = (results[backend]["forward"]
                                                    + results[backend]["backward_xw"])
    for backend, times in results.items():
        for phase, seconds in times.items():
            gbs = min_bytes[phase] * numel * bytes_per / seconds / 1e9
            rows.append({"shape": shape_text, "dtype": dtype_name, "layout": layout,
                         "backend": backend,
                         "phase": phase, "ms": seconds * 1e3, "GB/s": gbs,
                         "pct_copy_bw": 100 * gbs / copy_gbs, "copy_GB/s": copy_gbs,
                         "speedup_vs_torch": results["torch"][phase] / seconds,
                         "round_ms": [v * 1e3 for v in samples[backend].get(phase, [])]})
    return rows


def run(args):
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs a CUDA device")
    unknown = sorted(set(args.backends or ()) - set(_available_backends(device)))
    if unknown:
        raise SystemExit(f"--backends: {unknown} not available here; choose from "
                         f"{_available_backends(device)}")
    measure = graph_timer(device) if args.cuda_graph else timer(device)
    load_at_start = warn_if_loaded()
    shapes = args.shapes or DEFAULT_SHAPES[device.type]
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    rows = []
    out = result_path(args.json, f"mcs_{device.type}.json")

    def save(complete):
        # Rewritten after every shape and dtype, so a run cut short (scripts/gpu_check.sh
        # gives this step a time limit) keeps what it measured.
        write_json(out, {"benchmark": "bench_mcs", "complete": complete, "settings": vars(args),
                         "machine": machine_info(device), "load_average_at_start": load_at_start,
                         "rows": rows})

    for shape_text in shapes:
        shape = tuple(int(v) for v in shape_text.split("x"))
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            groups = {layout: measure_group(shape, dtype, layout, device, measure, args)
                      for layout in args.layouts}
            # One copy rate per shape and dtype (the copy reads and writes the same NCHW tensor
            # whatever the layout): its best round over every layout's group, the highest rate
            # and so the strictest denominator (it moved by up to 29% between groups of a run).
            copy_s = min(s for copies, _ in groups.values() for s in copies)
            for layout, (_, samples) in groups.items():
                rows += _group_rows(shape_text, shape, dtype_name, layout, copy_s, samples)
            save(complete=False)
    header = (f"{'shape':>14} {'dtype':>8} {'layout':>13} {'backend':>14} {'phase':>16} "
              f"{'ms':>9} {'GB/s':>8} {'%copy':>6} {'x torch':>8}")
    print(f"MCSConv k={args.kernel_size}, learnable (constrained), device {device} "
          f"({machine_info(device).get('gpu', 'CPU')}), median of {args.rounds} rounds of "
          f"{args.iters}, malloc {args.malloc}"
          + (", CUDA-graph replays (device time only)" if args.cuda_graph else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:>14} {r['dtype']:>8} {r['layout']:>13} {r['backend']:>14} "
              f"{r['phase']:>16} "
              f"{r['ms']:9.3f} {r['GB/s']:8.1f} {r['pct_copy_bw']:6.1f} "
              f"{r['speedup_vs_torch']:8.2f}")
    save(complete=True)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
