"""Two or more model variants' train steps in ONE process, taking turns round by round: for
differences of a few per cent, which separate runs on a noisy machine do not show (the
project's 2-core CPU drifts 10-20% within an hour). Per variant: the median wall time of a step
and the median operator time of the step's convolutions and matrix products (each ATen call
timed as it returns, as profile_train_step.py does), over the rounds. CPU only.

    python benchmarks/ab_train_step.py --variants fast fast-torch-pointwise --rounds 10
"""
import argparse
import contextlib
import statistics
import time

import torch

from bench_common import MALLOC_CHOICES, MALLOC_HELP, load_average, set_malloc
from model_variants import VARIANTS, build_variants
from profile_train_step import OperatorTimer, kind_of, make_train_step

# The kinds of profile_train_step.py that hold the convolutions' own time.
CONVOLUTION_KINDS = ("convolution forward", "convolution backward", "matrix products")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   default=["fast", "fast-torch-pointwise"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--depth", type=int, default=26)
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    args = p.parse_args(argv)
    if len(args.variants) < 2 or args.rounds < 1 or args.steps < 1:
        p.error("needs two or more variants, and --rounds and --steps of at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        run(args)


def run(args):
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, 2, (args.batch,))
    steps = {}
    for name, variant in build_variants(args.variants, args.depth, torch.device("cpu"),
                                        None).items():
        if isinstance(variant, str) or not variant.trainable:
            raise SystemExit(f"ab_train_step: {name} cannot train here "
                             f"({variant if isinstance(variant, str) else 'inference only'})")
        steps[name] = make_train_step(variant, x, target)
    print(f"== {len(steps)} variants taking turns: SFIConv-ResNet-{args.depth}, batch "
          f"{args.batch}, {args.size}x{args.size}, float32, cpu, malloc {args.malloc}, "
          f"{torch.get_num_threads()} threads, load average {load_average()}")
    for step in list(steps.values()) * 2:  # warm-up: oneDNN primitives, allocator state
        step()
    wall = {name: [] for name in steps}
    convolutions = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.rounds):
        # Alternate the order, so that neither variant always follows the other.
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            wall[name].append((time.perf_counter() - start) / args.steps * 1000)
            timer = OperatorTimer()
            with timer:
                steps[name]()
            convolutions[name].append(sum(ms for op, ms in timer.ms.items()
                                          if kind_of(op) in CONVOLUTION_KINDS))
    first = names[0]
    print(f"median over {args.rounds} rounds ({args.steps} timed steps each, then one step "
          f"with every operator timed)")
    print(f"{'variant':>24} {'step ms':>9} {'x ' + first:>12} {'convolutions ms':>16}")
    for name in names:
        step_ms = statistics.median(wall[name])
        print(f"{name:>24} {step_ms:9.1f} {statistics.median(wall[first]) / step_ms:12.3f} "
              f"{statistics.median(convolutions[name]):16.1f}")


if __name__ == "__main__":
    main()
