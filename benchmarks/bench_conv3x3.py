"""Layer-level benchmark of the CPU's 3x3 convolutions: Winograd F(4x4, 3x3)
(``conv3x3(..., backend="winograd")``, csrc/winograd_cpu.cpp) against PyTorch's (oneDNN), forward
and forward+backward, float32, channels_last inputs and weights as in the fast model, at the
fast model's four 3x3 shapes (batch 8, 256 px input). Prints a table and writes JSON.

    python benchmarks/bench_conv3x3.py --malloc no-mmap
"""
import argparse
import contextlib

import torch

from sficonv_ext import ops

from bench_common import (MALLOC_CHOICES, MALLOC_HELP, machine_info, result_path, set_malloc,
                          warn_if_loaded, write_json)
from bench_fused_layers import time_paths
from bench_mcs import timer

# SFIConv-ResNet-26's 3x3 layers at batch 8, 256x256: channels x map side, layer1 to layer4.
MODEL_SHAPES = ("8x64x64x64", "8x128x32x32", "8x256x16x16", "8x512x8x8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(MODEL_SHAPES),
                   help="NxCxHxW inputs (the weight is CxCx3x3); default: the fast model's")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the paths take turns "
                   "(the result is the median of the rounds' medians)")
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def shape_rows(shape_text, args, measure):
    n, c, h, w = (int(v) for v in shape_text.split("x"))
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    g = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)

    def call(path, x):
        return ops.conv3x3(x, weight, backend=path)
    times = time_paths(["torch", "winograd"], call, (x,), (x.detach().clone().requires_grad_(),),
                       g, args, measure, params=(weight,))
    return [{"shape": shape_text, "path": path, "phase": phase, "ms": seconds * 1e3,
             "speedup": times["torch"][phase] / seconds}
            for path in times for phase, seconds in times[path].items()]


def main(argv=None):
    args = parse_args(argv)
    if not ops.backends()["cpp"]:
        raise SystemExit("bench_conv3x3 needs the compiled extension (the Winograd kernels)")
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        measure = timer(torch.device("cpu"))
        load_at_start = warn_if_loaded()
        rows = [row for shape in args.shapes for row in shape_rows(shape, args, measure)]
    print(f"3x3 convolutions, float32, channels_last, CPU: Winograd F(4x4, 3x3) against "
          f"PyTorch's (oneDNN), median of {args.rounds} rounds of {args.iters}, malloc "
          f"{args.malloc}")
    header = f"{'input':>14} {'path':>9} {'phase':>17} {'ms':>9} {'x torch':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:>14} {r['path']:>9} {r['phase']:>17} {r['ms']:9.3f} "
              f"{r['speedup']:8.2f}")
    out = result_path(args.json, "conv3x3_cpu.json")
    write_json(out, {"benchmark": "bench_conv3x3", "settings": vars(args),
                     "machine": machine_info(torch.device("cpu")),
                     "load_average_at_start": load_at_start, "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
