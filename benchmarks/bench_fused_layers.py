"""Layer-level benchmark of the fused ops against the PyTorch compositions they replace, forward
and forward+backward, in the fast model's layout (channels_last):
- the first SFIConv layer: fused Triton op (CUDA) vs MCSConv op + two cuDNN/oneDNN 1x1
  convolutions + cat, and one plain 1x1 convolution of the same weight shape (what the layer
  costs in an ordinary CNN: the limit);
- the training epilogue BatchNorm + residual add + ReLU: Triton (CUDA) or C++ (CPU) vs
  nn.BatchNorm2d + add_ + relu_.
Prints a table and writes JSON.

    python benchmarks/bench_fused_layers.py     # CUDA: batch 64 at 256x256 (layer1's shapes);
                                                # CPU: batch 8, float32
"""
import argparse
import contextlib
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F

from sficonv_ext import ops

from bench_common import (MALLOC_CHOICES, MALLOC_HELP, machine_info, result_path, set_malloc,
                          warn_if_loaded, write_json)
from bench_mcs import timer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, help="NxC_inxHxW of the first layer's input "
                   "(default: 64x64x64x64 on CUDA, 8x64x64x64 on the CPU)")
    p.add_argument("--norm-shape", default=None,
                   help="NxCxHxW of the epilogue (default: layer1's block output, "
                   "64x256x64x64 on CUDA, 8x256x64x64 on the CPU)")
    p.add_argument("--out-channels", type=int, default=64)
    p.add_argument("--dtypes", nargs="*", default=None, choices=DTYPES,
                   help="default: bfloat16 float32 on CUDA, float32 on the CPU")
    p.add_argument("--learnable", action="store_true", help="learnable MCS filter (default: "
                   "the published frozen one)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the paths take turns "
                   "(the result is the median of the rounds' medians)")
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    batch = 64 if args.device.startswith("cuda") else 8
    args.shape = args.shape or f"{batch}x64x64x64"
    args.norm_shape = args.norm_shape or f"{batch}x256x64x64"
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if batch == 64 else ["float32"])
    return args


def _triton_here(device):
    return device.type == "cuda" and ops.backends()["triton_ops"]


def _plain_conv(x, weight, mcs_weight):
    return F.conv2d(x, weight)


def first_layer_rows(args, device, measure):
    n, cin, h, w = (int(v) for v in args.shape.split("x"))
    cout, split = args.out_channels, args.out_channels // 2
    paths = ["composed"] + (["triton"] if _triton_here(device) else []) + ["plain-conv"]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        x = torch.randn(n, cin, h, w, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        weight = torch.randn(cout, cin, 1, 1, device=device, dtype=dtype, requires_grad=True)
        mcs_weight = (torch.rand(cin, 1, 5, 5, device=device) + 0.5).to(dtype)
        mcs_weight.requires_grad_(args.learnable)
        g = torch.randn(n, cout, h, w, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        inputs, trainable = (x, weight, mcs_weight), (x.detach().clone().requires_grad_(),
                                                      weight, mcs_weight)

        def call(path, x, weight, mcs_weight):
            if path == "plain-conv":
                return _plain_conv(x, weight, mcs_weight)
            return ops.first_sfi_conv(x, weight, mcs_weight, split, backend=path,
                                      constrained=args.learnable)
        times = time_paths(paths, call, inputs, trainable, g, args, measure)
        rows += _rows("first layer " + args.shape, dtype_name, times, "composed")
    return rows


def norm_act_rows(args, device, measure):
    shape = tuple(int(v) for v in args.norm_shape.split("x"))
    cpp = device.type == "cpu" and ops.backends()["cpp"]
    paths = ["torch"] + (["triton"] if _triton_here(device) else []) + (["cpp"] if cpp else [])
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        x, residual, g = (torch.randn(shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last) for _ in range(3))
        bn = nn.BatchNorm2d(shape[1]).to(device).train()
        trainable = (x.detach().clone().requires_grad_(),
                     residual.detach().clone().requires_grad_())

        def call(path, x, residual):
            # The torch path adds in place into BatchNorm's fresh output: x stays intact.
            return ops.batch_norm_act(x, bn, residual, True, backend=path)
        times = time_paths(paths, call, (x, residual), trainable, g, args, measure,
                           params=(bn.weight, bn.bias))
        rows += _rows("bn+add+relu " + args.norm_shape, dtype_name, times, "torch")
    return rows


def time_paths(paths, call, inputs, trainable_inputs, grad, args, measure, params=()):
    """{path: {"forward": s, "forward_backward": s}} for ``call(path, *inputs)``; the
    forward+backward step runs on ``trainable_inputs`` and returns the gradients of those that
    want one and of ``params``. Through torch.autograd.grad, as a training step with
    zero_grad(set_to_none=True) takes them: .backward() on the same leaves again and again
    would add an accumulation pass per gradient (10-24% of the CPU epilogue's step). The paths
    take turns over ``args.rounds`` rounds, so a slow spell of the machine hits them alike."""
    leaves = [t for t in (*trainable_inputs, *params) if t.requires_grad]
    samples = {path: {"forward": [], "forward_backward": []} for path in paths}
    for round_index in range(args.rounds):
        warmup = args.warmup if round_index == 0 else 1
        for path in paths:
            with torch.no_grad():
                samples[path]["forward"].append(
                    measure(lambda: call(path, *inputs), warmup, args.iters))
            # allow_unused: the plain convolution never reads a learnable MCS filter.
            samples[path]["forward_backward"].append(measure(
                lambda: torch.autograd.grad(call(path, *trainable_inputs), leaves, grad,
                                            allow_unused=True),
                warmup, args.iters))
    return {path: {phase: statistics.median(values) for phase, values in phases.items()}
            for path, phases in samples.items()}


def _rows(layer, dtype_name, times, baseline):
    return [{"layer": layer, "dtype": dtype_name, "path": path, "phase": phase,
             "ms": seconds * 1e3, "speedup": times[baseline][phase] / seconds}
            for path in times for phase, seconds in times[path].items()]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        if device.type == "cuda":
            # float32 compared in float32 on both sides: the fused Triton layer computes in
            # IEEE float32, and cuDNN would otherwise round the composed path's products to
            # TF32 (PyTorch's default), a cheaper product (bfloat16 rows are not affected).
            stack.enter_context(_no_tf32())
        run(args, device)


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run(args, device):
    measure = timer(device)
    load_at_start = warn_if_loaded()
    rows = first_layer_rows(args, device, measure) + norm_act_rows(args, device, measure)
    print(f"Fused layers vs their PyTorch compositions, channels_last, MCS "
          f"{'learnable' if args.learnable else 'frozen'}, device {device} "
          f"({machine_info(device).get('gpu', 'CPU')}), median of {args.rounds} rounds of "
          f"{args.iters}, malloc "
          f"{args.malloc}")
    header = (f"{'layer':>26} {'dtype':>9} {'path':>9} {'phase':>17} {'ms':>9} "
              f"{'x baseline':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layer']:>26} {r['dtype']:>9} {r['path']:>9} {r['phase']:>17} "
              f"{r['ms']:9.3f} {r['speedup']:11.2f}")
    out = result_path(args.json, f"fused_layers_{device.type}.json")
    write_json(out, {"benchmark": "bench_fused_layers", "settings": vars(args),
                     "machine": machine_info(device), "load_average_at_start": load_at_start,
                     "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
