"""Where one inference forward spends its GPU time, per model variant: kernel launches, total
kernel time and the kernels that take most of it (torch.profiler, CUDA activity; with
``--device cpu``, ATen operators and their own CPU time instead).

Written for the question the H100 runs left open: why eager ``fuse_for_inference`` (BatchNorm
folded away) ran slower than the unfolded fast model. Run by scripts/gpu_check.sh into bench.log:

    python benchmarks/profile_inference.py [--batch 64] [--dtype bfloat16] [--variants ...]
"""
import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from model_variants import VARIANTS, build_variants

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(variant, x, iters):
    """(kernels per forward, kernel microseconds per forward, {kernel name: microseconds});
    on a CPU the operators and their self time."""
    on_gpu = x.device.type == "cuda"
    if variant.channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x.device.type, dtype=variant.amp_dtype,
                              enabled=variant.amp_dtype is not None)
    model = variant.model.eval()
    with torch.inference_mode(), autocast:
        for _ in range(3):  # warm-up: cuDNN plans, Triton compiles, CUDA-graph capture
            model(x)
        _sync(x.device)
        activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            for _ in range(iters):
                model(x)
            _sync(x.device)
    per_kernel, launches = collections.Counter(), 0
    wanted = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    for event in prof.events():
        if event.device_type == wanted:
            us = event.device_time if on_gpu else event.self_cpu_time_total
            per_kernel[event.name] += us / iters
            launches += 1
    return launches / iters, sum(per_kernel.values()), per_kernel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=26)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=["fast", "plain", "fused-inference", "fused-inference-lowp",
                                 "fused-inference-cudnn"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_inference.py: no CUDA device (use --device cpu for a CPU "
                         "operator profile)")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"== inference kernel profile: SFIConv-ResNet-{args.depth}, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.dtype}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    for name, variant in build_variants(args.variants, args.depth, device,
                                        DTYPES[args.dtype]).items():
        if isinstance(variant, str):
            print(f"profile {name}: not built ({variant})")
            continue
        try:
            launches, total_us, per_kernel = kernel_times(variant, x, args.iters)
        except Exception as error:  # noqa: BLE001  (one variant's failure is reported)
            print(f"profile {name}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        unit = "kernels" if device.type == "cuda" else "operators"
        print(f"profile {name}: {launches:.0f} {unit} per forward, {total_us / 1000:.3f} ms "
              f"of {unit[:-1]} time")
        for kernel, us in per_kernel.most_common(args.top):
            print(f"    {us / 1000:8.3f} ms  {100 * us / total_us:5.1f}%  {kernel[:110]}")
        del variant
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
