"""Runs each MCSConv GPU kernel a few times on the benchmark's first shape, for a profiler.

Not a benchmark (nothing is timed here): a driver for Nsight Compute, which `scripts/gpu_check.sh`
runs under `ncu` when the machine has it, so that a GPU session brings back why a kernel is as
fast as it is (memory throughput, occupancy, registers, stall reasons), not only how fast.

    ncu --section SpeedOfLight --section Occupancy python benchmarks/profile_mcs_kernels.py

Each phase is announced on stdout before its kernels run, so the profiler's report can be read
against it. Phases, float32, for the CUDA and Triton backends (those built): first forward +
backward with the weight gradient (learnable filter), then forward alone, in NCHW and then
channels_last; last the NCHW forward of each experimental CUDA tile kernel. The weight gradient
comes first because it is most of the backward's time (issue 3) and a profiler cut short by its
time or launch limit (as on the H200 of 2026-11-27) then still reaches it.
"""
import argparse
import os

import torch

from sficonv_ext import ops


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="64x64x64x64", help="NxCxHxW")
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="calls per phase")
    return p.parse_args(argv)


def backends_here():
    info = ops.backends()
    return [b for b, ok in (("cuda", info["cuda"]), ("triton", info["triton_ops"])) if ok]


# The NCHW kernels other than the default (the double-buffered tiles, see
# csrc/mcs_conv_cuda.cu): forward only, profiled last.
EXPERIMENTS = {"tiles": ("SFICONV_CUDA_NCHW_KERNEL", "tiles"),
               "tiles-mb3": ("SFICONV_CUDA_TILE_MIN_BLOCKS", "3")}


def experimental_nchw_forwards(n, c, h, w, k, repeats):
    x = torch.randn(n, c, h, w, device="cuda")
    weight = torch.rand(c, 1, k, k, device="cuda") + 0.5
    for name, (variable, value) in EXPERIMENTS.items():
        previous = os.environ.get(variable)
        os.environ[variable] = value  # read by the extension on every call
        try:
            with torch.no_grad():
                ops.mcs_conv(x, weight, backend="cuda")
                torch.cuda.synchronize()
                print(f"== phase: cuda nchw forward ({variable}={value})", flush=True)
                for _ in range(repeats):
                    ops.mcs_conv(x, weight, backend="cuda")
                torch.cuda.synchronize()
        finally:
            if previous is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = previous


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_mcs_kernels.py needs a CUDA device")
    n, c, h, w = (int(v) for v in args.shape.split("x"))
    k = args.kernel_size
    torch.manual_seed(0)
    nchw_kernel = os.environ.get("SFICONV_CUDA_NCHW_KERNEL", "tiles-pipelined")
    fused_backward = os.environ.get("SFICONV_CUDA_FUSED_BACKWARD", "0")
    kernels = (f"SFICONV_CUDA_NCHW_KERNEL={nchw_kernel}, "
               f"SFICONV_CUDA_FUSED_BACKWARD={fused_backward}")
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=fmt)
        weight = (torch.rand(c, 1, k, k, device="cuda") + 0.5).requires_grad_()
        grad = torch.randn_like(x)
        for backend in backends_here():
            # Compile and load outside the phases (Triton's first call), so each phase holds
            # only the kernels a steady-state call runs.
            ops.mcs_conv(x, weight, backend=backend).backward(grad)
            torch.cuda.synchronize()
            print(f"== phase: {backend} {layout} forward+backward (x and weight; "
                  f"{kernels})", flush=True)
            xg = x.detach().clone().requires_grad_()
            for _ in range(args.repeats):
                ops.mcs_conv(xg, weight, backend=backend).backward(grad)
            torch.cuda.synchronize()
            print(f"== phase: {backend} {layout} forward", flush=True)
            with torch.no_grad():
                for _ in range(args.repeats):
                    ops.mcs_conv(x, weight, backend=backend)
            torch.cuda.synchronize()
    if "cuda" in backends_here():
        experimental_nchw_forwards(n, c, h, w, k, args.repeats)
    print("== done", flush=True)


if __name__ == "__main__":
    main()
