"""Layer-level benchmark of the CPU's 1x1 convolutions: one matrix product
(``conv1x1(..., backend="gemm")``, sficonv_ext/ops/conv1x1.py) against PyTorch's convolution
(oneDNN), forward and forward+backward, float32, channels_last inputs and weights as in the fast
model, at the fast model's 1x1 shapes of layers 2-4 (batch 8, 256 px input) and one of
layer1's. Prints a table and writes JSON.

    python benchmarks/bench_conv1x1.py --malloc no-mmap
"""
import torch

from sficonv_ext import ops

import layer_table
from bench_fused_layers import time_paths

# SFIConv-ResNet-26's 1x1 layers at batch 8, 256x256 (input NxCxHxW : output channels): one of
# layer1 (64x64, where "auto" keeps oneDNN), then layer2 to layer4's expand and reduce layers.
MODEL_SHAPES = ("8x64x64x64:256", "8x128x32x32:512", "8x512x32x32:128", "8x256x16x16:1024",
                "8x1024x16x16:256", "8x512x8x8:2048", "8x1024x8x8:2048", "8x2048x8x8:512")


def parse_args(argv=None):
    return layer_table.parse_args(
        __doc__.split("\n\n")[0], MODEL_SHAPES,
        "NxCxHxW:K (input and output channels); default: the fast model's", argv)


def parse_shape(text):
    """"NxCxHxW:K" -> (N, C, H, W, K)."""
    try:
        size, k = text.split(":")
        n, c, h, w = (int(v) for v in size.split("x"))
        return n, c, h, w, int(k)
    except ValueError:
        raise SystemExit(f"bench_conv1x1: a shape is NxCxHxW:K (e.g. 8x512x8x8:2048), got "
                         f"{text!r}") from None


def shape_rows(shape_text, args, measure):
    n, c, h, w, k = parse_shape(shape_text)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 1, 1).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    g = torch.randn(n, k, h, w).contiguous(memory_format=torch.channels_last)

    def call(path, x):
        return ops.conv1x1(x, weight, backend=path)
    times = time_paths(["torch", "gemm"], call, (x,), (x.detach().clone().requires_grad_(),),
                       g, args, measure, params=(weight,))
    return layer_table.shape_rows_from(shape_text, times)


def main(argv=None):
    args = parse_args(argv)
    for shape in args.shapes:  # a bad one named before any time is spent measuring
        parse_shape(shape)
    rows, load_at_start = layer_table.measure_shapes(args, shape_rows)
    layer_table.report(args, rows, load_at_start, "1x1 convolutions, float32, channels_last, "
                       "CPU: one matrix product against PyTorch's (oneDNN)", "bench_conv1x1",
                       "conv1x1_cpu.json", "input:K")


if __name__ == "__main__":
    main()
