"""Model benchmark: the published reference vs the fast SFIConv-ResNet, side by side.

Measures, on one device in one run: train step (forward + backward + Adam step) and inference
throughput in images/s, the speedup of each variant over the published reference in eager
float32, and (on CUDA) the peak memory a train step adds. The variants are described in
``model_variants.py``. Prints a table and writes a JSON result (machine, versions, settings,
every timing).

    python benchmarks/bench_models.py                      # CPU, ResNet-26, batch 8, 256x256
    python benchmarks/bench_models.py --device cuda --batch 64 --dtype bfloat16
    python benchmarks/bench_models.py --variants reference fast fast-compiled
"""
import argparse
import contextlib
import statistics
import sys
import time

import torch

from sficonv_ext import reference

from bench_common import (MALLOC_CHOICES, MALLOC_HELP, machine_info, result_path, set_malloc,
                          warn_if_loaded, write_json)
from model_variants import DEFAULT_VARIANTS, VARIANTS, build_variants

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
                        "what the sficonv trainer uses on CPU and CUDA) or PyTorch's default")
    p.add_argument("--variants", nargs="*", default=None, choices=VARIANTS,
                   help="what to compare (default: the eager variants for the device; see "
                        "model_variants.py); the first is the baseline of the 'x ref' columns")
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every variant, as "
                        "sficonv train sets it on CUDA (autotuning falls in the warm-up)")
    p.add_argument("--json", default=None, help="where to write the JSON result "
                   "(default: runs/bench/models_<device>.json)")
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


def make_steps(variant, x, target, args):
    """{"train": fn, "infer": fn} for one variant (train only when it can train)."""
    model = variant.model
    if variant.channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x.device.type, dtype=variant.amp_dtype,
                              enabled=variant.amp_dtype is not None)
    steps = {}
    if variant.trainable and not args.skip_train:
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
        train.release = lambda: opt.zero_grad(set_to_none=True)
        steps["train"] = train

    def infer():
        model.eval()
        with torch.inference_mode(), autocast:
            model(x)
    steps["infer"] = infer
    return steps


def peak_step_memory(fn, device, release=None):
    """Bytes a call of ``fn`` allocates above what was allocated before it (CUDA only). A
    CUDA-graph variant allocates its pool at capture, earlier: its figure leaves the pool out.
    ``release`` runs first: a train step frees the gradients the warm-up left, so that the
    figure counts them (the step sets them to None only once it starts)."""
    if device.type != "cuda":
        return None
    if release is not None:
        release()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_interleaved(variants, args, device, on_progress=None):
    """Median seconds per step for every (variant, phase), each step's peak memory, and the
    error of any step that failed (reported, not fatal: one broken variant must not cost the
    others' numbers). Variants take turns over several rounds, so a slow spell of the machine
    hits them all alike. ``on_progress(medians, memory, errors, warmup)`` runs after every
    measurement, so a run stopped part-way still leaves its numbers. ``warmup`` holds each
    step's warm-up seconds (a compiled variant's compile time), also printed as it ends: a run
    cut during a compile still says how far that compile had got."""
    times = {(name, phase): [] for name, steps in variants.items() for phase in steps}
    memory, errors, warmup = {}, {}, {}
    for round_index in range(args.rounds):
        for name, steps in variants.items():
            for phase, fn in steps.items():
                if (name, phase) in errors:
                    continue
                try:
                    if round_index == 0:
                        print(f"{name} {phase}: {args.warmup} warm-up steps ...", flush=True)
                        start, finished = time.perf_counter(), False
                        try:
                            for _ in range(args.warmup):
                                fn()
                            _sync(device)
                            finished = True
                        finally:  # a failed or interrupted warm-up (compile) says how long too
                            warmup[(name, phase)] = time.perf_counter() - start
                            print(f"{name} {phase}: warm-up "
                                  f"{'took' if finished else 'stopped after'} "
                                  f"{warmup[(name, phase)]:.1f} s", flush=True)
                        memory[(name, phase)] = peak_step_memory(
                            fn, device, getattr(fn, "release", None))
                    times[(name, phase)].append(time_it(fn, device, 1, args.iters))
                except Exception as error:  # noqa: BLE001  (reported in the table and JSON)
                    errors[(name, phase)] = f"{type(error).__name__}: {error}"[:300]
                    print(f"{name} {phase} FAILED: {errors[(name, phase)]}", flush=True)
                if on_progress is not None:
                    on_progress(_medians(times, errors), memory, errors, warmup)
    return _medians(times, errors), memory, errors, warmup


def _medians(times, errors):
    """{key: (median seconds, rounds it is the median of)}."""
    return {key: (statistics.median(v), len(v)) for key, v in times.items()
            if v and key not in errors}


def print_table(rows, batch, rounds=None):
    """The table; the 'x ref' columns are ratios to the first variant, named above it (a
    baseline that failed to build would otherwise silently be another)."""
    ref = rows[0]
    print(f"x ref: images/s relative to {ref['variant']!r}"
          + (" (NOT BUILT: the ratios are missing)" if "build_error" in ref else ""))
    header = (f"{'variant':26} {'train img/s':>12} {'x ref':>7} {'infer img/s':>12} {'x ref':>7}"
              f" {'step adds MiB':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        def cell(key):
            if key.replace("_s", "_error") in r:
                return f"{'FAILED':>12} {'-':>7}"
            if key not in r or key not in ref:
                return f"{'-':>12} {'-':>7}"
            ips = batch / r[key]
            return f"{ips:12.2f} {ref[key] / r[key]:7.2f}"
        if "build_error" in r:
            print(f"{r['variant']:26} {'not built':>12}")
            continue
        peak = r.get("train_peak_bytes")
        peak_text = f"{peak / 2**20:14.0f}" if peak is not None else f"{'-':>14}"
        print(f"{r['variant']:26} {cell('train_s')} {cell('infer_s')} {peak_text}")
    short = [f"{r['variant']} {phase} ({r[phase + '_rounds']})" for r in rows
             for phase in ("train", "infer") if r.get(phase + "_rounds", rounds) != rounds]
    if rounds is not None and short:
        print(f"fewer rounds than the {rounds} asked (a run cut short): " + ", ".join(short))


def collect_rows(names, variants, medians, memory, errors, build_errors, warmup=None):
    """One row per variant in the order ``names`` lists them (the first is the baseline of the
    ratios, even when it failed to build)."""
    rows = []
    for name in names:
        if name in build_errors:
            rows.append({"variant": name, "build_error": build_errors[name]})
            continue
        row = {"variant": name}
        for phase in variants[name]:
            if warmup and (name, phase) in warmup:
                row[f"{phase}_warmup_s"] = warmup[(name, phase)]
            if (name, phase) in medians:
                row[f"{phase}_s"], row[f"{phase}_rounds"] = medians[(name, phase)]
                row[f"{phase}_peak_bytes"] = memory.get((name, phase))
            elif (name, phase) in errors:
                row[f"{phase}_error"] = errors[(name, phase)]
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        return run(args, device)


def run(args, device):
    amp_dtype = None if args.dtype == "float32" else DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 2, (args.batch,), device=device)
    names = args.variants or DEFAULT_VARIANTS[device.type]
    variants, build_errors = {}, {}
    for name, variant in build_variants(names, args.depth, device, amp_dtype).items():
        if isinstance(variant, str):
            build_errors[name] = variant
            print(f"{name} could not be built: {variant}", flush=True)
        else:
            variants[name] = make_steps(variant, x, target, args)
    out = result_path(args.json, f"models_{device.type}.json")
    load_at_start = warn_if_loaded()

    def save(medians, memory, errors, warmup, complete=False):
        rows = collect_rows(names, variants, medians, memory, errors, build_errors, warmup)
        result = {"benchmark": "bench_models", "complete": complete, "settings": vars(args),
                  "baseline": names[0],
                  "machine": machine_info(device), "load_average_at_start": load_at_start,
                  "rows": [{**r, **{k.replace("_s", "_images_per_s"): args.batch / r[k]
                                    for k in ("train_s", "infer_s") if k in r}} for r in rows]}
        write_json(out, result)
        return rows, result

    print(f"measuring {len(variants)} variants, {args.rounds} interleaved rounds ...", flush=True)
    medians, memory, errors, warmup = measure_interleaved(variants, args, device,
                                                          on_progress=save)
    rows, result = save(medians, memory, errors, warmup, complete=True)
    print(f"\nSFIConv-ResNet-{args.depth}, batch {args.batch}, {args.size}x{args.size}, "
          f"{args.dtype}, device {device} ({machine_info(device).get('gpu', 'CPU')}), "
          f"{args.optimizer}, median over {args.rounds} rounds of {args.iters} steps, "
          f"malloc {args.malloc}")
    print_table(rows, args.batch, args.rounds)
    print(f"\nwrote {out}")
    if errors or build_errors:
        sys.exit(f"{len(errors) + len(build_errors)} variant step(s) failed: see the *_error "
                 f"fields in {out}")
    return result


if __name__ == "__main__":
    main()
