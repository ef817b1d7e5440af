"""Where one training step (forward, backward, Adam) spends its time, per model variant: the
time of every ATen operator call summed into kinds (convolution forward and backward,
BatchNorm, ReLU, adds, pooling, MCSConv, Adam, the rest), and the step's FLOPs
(torch.utils.flop_counter). The README's CPU breakdown of the fast model's step, and its 144
GFLOP, come from this script.

On the CPU the step is first run untimed, for its wall time, page faults and system CPU time
(the kernel's share: mostly faulting in freshly mapped blocks, see sficonv_ext/cpu_allocator.py).
Then each operator call is timed as it returns (a dispatch mode around the whole step,
backward included: CPU operators are synchronous), which adds a few per cent; torch.profiler
added about 45% to the same step and spread it unevenly. One distortion: under the dispatch
mode every output has a Python object, so autograd no longer sums a tensor's gradients in
place (its buffer is not the last reference) and "adds" are overstated: 25-35 ms a step for
the fast model at batch 8, 256 px, where torch.profiler counted 11.8 ms of in-place adds
(2026-11-28). On CUDA, the profiler's device time.

    python benchmarks/profile_train_step.py --malloc no-mmap             # CPU, batch 8, 256 px
    python benchmarks/profile_train_step.py --variants fast plain --batch 2 --size 64
"""
import argparse
import collections
import contextlib
import os
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench_common import MALLOC_CHOICES, MALLOC_HELP, load_average, set_malloc
from bench_models import DTYPES
from model_variants import VARIANTS, build_variants

# Operator name fragments -> kind, first match wins (ATen names, and this package's ops).
KINDS = (
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward",
                              "winograd_conv3x3_backward", "conv1x1_rows_backward")),
    ("convolution forward", ("convolution", "conv2d", "mkldnn_convolution", "winograd",
                             "conv1x1_rows")),
    ("MCSConv", ("mcs_conv",)),
    ("BatchNorm", ("batch_norm", "native_batch_norm", "batch_norm_act")),
    ("ReLU", ("relu", "threshold_backward")),
    ("pooling", ("pool",)),
    # Before "adds": Adam's step counter is aten._foreach_add_.
    ("Adam", ("adam", "_foreach")),
    # Plain matrix products: the 1x1 convolutions' "gemm" path where the extension is not
    # built (with it, its C++ op counts as a convolution above), and the classifier's weight
    # gradient.
    ("matrix products", ("aten.mm", "aten::mm")),
    ("linear", ("addmm", "linear")),
    ("adds", ("add", "sum")),
    ("copies and layout", ("copy", "contiguous", "clone", "cat", "to", "empty", "zero", "fill")),
)


def kind_of(name):
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def make_train_step(variant, x, target):
    model = variant.model.train()
    if variant.channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x.device.type, dtype=variant.amp_dtype,
                              enabled=variant.amp_dtype is not None)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                           fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
    return step


class OperatorTimer(TorchDispatchMode):
    """Milliseconds per ATen operator (CPU: each call is synchronous)."""

    def __init__(self):
        super().__init__()
        self.ms = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.ms[str(func.overloadpacket)] += (time.perf_counter() - start) * 1000
        return out


def untimed_cpu_steps(step, iters):
    """(wall ms, minor page faults, system CPU ms) per step over ``iters`` plain steps."""
    usage, times, start = resource.getrusage(resource.RUSAGE_SELF), os.times(), time.perf_counter()
    for _ in range(iters):
        step()
    wall = (time.perf_counter() - start) / iters * 1000
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - usage.ru_minflt) / iters
    return wall, faults, (os.times().system - times.system) / iters * 1000


def profile_step(step, device, iters):
    """({kind: ms per step}, {operator: ms per step}) over ``iters`` profiled steps."""
    per_op = collections.Counter()
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                step()
            torch.cuda.synchronize(device)
        for avg in prof.key_averages():
            if avg.self_device_time_total > 0:
                per_op[avg.key] += avg.self_device_time_total / iters / 1000
    else:
        timer = OperatorTimer()
        with timer:
            for _ in range(iters):
                step()
        per_op.update({op: ms / iters for op, ms in timer.ms.items()})
    per_kind = collections.Counter()
    for name, ms in per_op.items():
        per_kind[kind_of(name)] += ms
    return per_kind, per_op


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=26)
    parser.add_argument("--iters", type=int, default=3, help="profiled steps (after 2 warm-up)")
    parser.add_argument("--top", type=int, default=6, help="operators listed per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["reference", "fast",
                                                                              "plain"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="autocast dtype for bfloat16/float16 (the reference variant stays "
                             "float32, as in bench_models.py)")
    parser.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_train_step.py: no CUDA device")
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        run(args, device)


def run(args, device):
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 2, (args.batch,), device=device)
    print(f"== train step profile: SFIConv-ResNet-{args.depth}, batch {args.batch}, "
          f"{args.size}x{args.size}, {args.dtype}, {device}, malloc {args.malloc}, "
          f"{torch.get_num_threads()} threads, load average {load_average()}")
    amp_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    for name, variant in build_variants(args.variants, args.depth, device, amp_dtype).items():
        if isinstance(variant, str) or not variant.trainable:
            print(f"{name}: not profiled ({variant if isinstance(variant, str) else 'no train'})")
            continue
        step = make_train_step(variant, x, target)
        for _ in range(2):  # warm-up: oneDNN primitives, allocator state, lazy init
            step()
        with FlopCounterMode(display=False) as flops:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize(device)
            timing = f"{(time.perf_counter() - start) / args.iters * 1000:.1f} ms a step"
        else:
            wall, faults, system_ms = untimed_cpu_steps(step, args.iters)
            timing = (f"{wall:.1f} ms a step, {faults:,.0f} page faults and {system_ms:.0f} ms "
                      f"of system CPU time a step")
        per_kind, per_op = profile_step(step, device, args.iters)
        total = sum(per_kind.values())
        print(f"{name}: {timing} (untimed), {flops.get_total_flops() / 1e9:.1f} GFLOP; "
              f"operator time {total:.1f} ms (every operator timed):")
        for kind, ms in per_kind.most_common():
            print(f"    {ms:8.1f} ms  {100 * ms / total:5.1f}%  {kind}")
        for op, ms in per_op.most_common(args.top):
            print(f"        {ms:8.1f} ms  {op[:90]}")


if __name__ == "__main__":
    main()
