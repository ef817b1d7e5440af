"""Layer-level benchmark of the first SFIConv layer: the fused Triton op against the composition
it replaces (MCSConv op + two cuDNN 1x1 convolutions + torch.cat), forward and forward+backward,
in the fast model's layout (channels_last). Prints a table and writes JSON.

    python benchmarks/bench_first_layer.py                   # CUDA: [64, 64, 64, 64]
"""
import argparse
import json
import os

import torch

from sficonv_ext import ops

from bench_mcs import timer
from bench_models import machine_info

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="64x64x64x64", help="NxC_inxHxW of the layer's input")
    p.add_argument("--out-channels", type=int, default=64)
    p.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"], choices=DTYPES)
    p.add_argument("--learnable", action="store_true", help="learnable MCS filter (default: "
                   "the published frozen one)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    measure = timer(device)
    n, cin, h, w = (int(v) for v in args.shape.split("x"))
    cout, split = args.out_channels, args.out_channels // 2
    paths = ["composed"] + (["triton"] if ops.backends()["triton_ops"] else [])
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
        times = {}
        for path in paths:
            def forward():
                return ops.first_sfi_conv(x, weight, mcs_weight, split, backend=path,
                                          constrained=args.learnable)
            with torch.no_grad():
                fwd = measure(forward, args.warmup, args.iters)
            xr = x.detach().clone().requires_grad_()

            def train():
                y = ops.first_sfi_conv(xr, weight, mcs_weight, split, backend=path,
                                       constrained=args.learnable)
                y.backward(g)
            times[path] = {"forward": fwd, "forward_backward": measure(train, args.warmup,
                                                                       args.iters)}
        for path in paths:
            for phase, seconds in times[path].items():
                rows.append({"dtype": dtype_name, "path": path, "phase": phase,
                             "ms": seconds * 1e3,
                             "speedup_vs_composed": times["composed"][phase] / seconds})
    print(f"First SFIConv layer, x {args.shape} channels_last -> {cout} channels, "
          f"MCS {'learnable' if args.learnable else 'frozen'}, device {device} "
          f"({machine_info(device).get('gpu', 'CPU')}), median of {args.iters}")
    header = f"{'dtype':>9} {'path':>9} {'phase':>17} {'ms':>9} {'x composed':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['dtype']:>9} {r['path']:>9} {r['phase']:>17} {r['ms']:9.3f} "
              f"{r['speedup_vs_composed']:11.2f}")
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"first_layer_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": "bench_first_layer", "settings": vars(args),
                   "machine": machine_info(device), "rows": rows}, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
