"""Model benchmark: the published reference vs the fast SFIConv-ResNet, side by side.

Measures, on one device in one run: train step (forward + backward + Adam step) and inference
throughput in images/s, and the speedup of each variant over the reference. Prints a table and
writes a JSON result (machine, versions, settings, every timing).

    python benchmarks/bench_models.py                      # CPU, ResNet-26, batch 8, 256x256
    python benchmarks/bench_models.py --device cuda --batch 64 --dtype bfloat16
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import sficonv_ext
from sficonv_ext import models, reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=26, choices=sorted(reference.DEPTHS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="image height and width")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="autocast dtype for bfloat16/float16 (weights stay float32)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds over all variants (the result is the median)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--optimizer", default="adam-fused", choices=["adam-fused", "adam"],
                   help="Adam for every variant: fused=True (one kernel for all parameters, "
                        "what the sficonv trainer uses) or the default per-parameter loop")
    p.add_argument("--json", default=None, help="where to write the JSON result "
                   "(default: benchmarks/results/models_<device>.json)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device, warmup, iters):
    """Median seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_variants(depth, device):
    """name -> (model, trainable). All hold the same weights; inputs arrive NCHW, as from a
    data loader (the fast model converts to its own layout on entry)."""
    ref = reference.PublishedTrainingWrapper(depth).to(device)
    build = getattr(models, f"sfi_resnet{depth}")
    fast = build().to(device)  # default: channels_last
    fast.load_state_dict(ref.state_dict())
    fast_nchw = build(channels_last=False).to(device)
    fast_nchw.load_state_dict(ref.state_dict())
    return {
        "reference (published, eager NCHW)": (ref, True),
        "fast, NCHW (channels_last=False)": (fast_nchw, True),
        "fast (default: channels_last)": (fast, True),
        "fast + fuse_for_inference": (models.fuse_for_inference(fast), False),
    }


def make_steps(model, x, target, trainable, args, device, amp_dtype):
    """{"train": fn, "infer": fn} for one variant (train only when it can train)."""
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    steps = {}
    if trainable and not args.skip_train:
        # The same optimizer for every variant; frozen parameters never get a gradient.
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                               fused=args.optimizer == "adam-fused")

        def train():
            model.train()
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
        steps["train"] = train

    def infer():
        model.eval()
        with torch.inference_mode(), autocast:
            model(x)
    steps["infer"] = infer
    return steps


def measure_interleaved(variants, args, device):
    """Median seconds per step for every (variant, phase). Variants take turns over several
    rounds, so a slow spell of the machine hits them all alike rather than one of them."""
    times = {(name, phase): [] for name, steps in variants.items() for phase in steps}
    for round_index in range(args.rounds):
        for name, steps in variants.items():
            for phase, fn in steps.items():
                warmup = args.warmup if round_index == 0 else 1
                times[(name, phase)].append(time_it(fn, device, warmup, args.iters))
    return {key: statistics.median(values) for key, values in times.items()}


def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "sficonv_ext": sficonv_ext.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def print_table(rows, batch):
    header = f"{'variant':36} {'train img/s':>12} {'x ref':>7} {'infer img/s':>12} {'x ref':>7}"
    print(header)
    print("-" * len(header))
    ref = rows[0]
    for r in rows:
        def cell(key):
            if key not in r:
                return f"{'-':>12} {'-':>7}"
            ips = batch / r[key]
            return f"{ips:12.2f} {ref[key] / r[key]:7.2f}"
        print(f"{r['variant']:36} {cell('train_s')} {cell('infer_s')}")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device")
    amp_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 2, (args.batch,), device=device)
    variants = {}
    for name, (model, trainable) in build_variants(args.depth, device).items():
        variants[name] = make_steps(model, x, target, trainable, args, device, amp_dtype)
    print(f"measuring {len(variants)} variants, {args.rounds} interleaved rounds ...", flush=True)
    medians = measure_interleaved(variants, args, device)
    rows = []
    for name, steps in variants.items():
        rows.append({"variant": name, **{f"{phase}_s": medians[(name, phase)] for phase in steps}})
    print(f"\nSFIConv-ResNet-{args.depth}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.dtype}, device {device} ({machine_info(device).get('gpu', 'CPU')}), "
          f"{args.optimizer}, median over {args.rounds} rounds of {args.iters} steps")
    print_table(rows, args.batch)
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"models_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    result = {"benchmark": "bench_models", "settings": vars(args), "machine": machine_info(device),
              "rows": [{**r, **{k.replace("_s", "_images_per_s"): args.batch / r[k]
                                for k in ("train_s", "infer_s") if k in r}} for r in rows]}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
