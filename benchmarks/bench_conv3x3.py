"""Layer-level benchmark of the CPU's 3x3 convolutions: Winograd F(4x4, 3x3)
(``conv3x3(..., backend="winograd")``, csrc/winograd_cpu.cpp) against PyTorch's (oneDNN), forward
and forward+backward, float32, channels_last inputs and weights as in the fast model, at the
fast model's four 3x3 shapes (batch 8, 256 px input). Prints a table and writes JSON.

    python benchmarks/bench_conv3x3.py --malloc no-mmap
"""
import torch

from sficonv_ext import ops

import layer_table
from bench_fused_layers import time_paths

# SFIConv-ResNet-26's 3x3 layers at batch 8, 256x256: channels x map side, layer1 to layer4.
MODEL_SHAPES = ("8x64x64x64", "8x128x32x32", "8x256x16x16", "8x512x8x8")


def parse_args(argv=None):
    return layer_table.parse_args(
        __doc__.split("\n\n")[0], MODEL_SHAPES,
        "NxCxHxW inputs (the weight is CxCx3x3); default: the fast model's", argv)


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
    return layer_table.shape_rows_from(shape_text, times)


def main(argv=None):
    args = parse_args(argv)
    if not ops.backends()["cpp"]:
        raise SystemExit("bench_conv3x3 needs the compiled extension (the Winograd kernels)")
    rows, load_at_start = layer_table.measure_shapes(args, shape_rows)
    layer_table.report(args, rows, load_at_start, "3x3 convolutions, float32, channels_last, "
                       "CPU: Winograd F(4x4, 3x3) against PyTorch's (oneDNN)", "bench_conv3x3",
                       "conv3x3_cpu.json", "input")


if __name__ == "__main__":
    main()
