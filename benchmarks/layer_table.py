"""The shared driver of the CPU layer benchmarks (bench_conv3x3.py, bench_conv1x1.py): each
shape's rows measured under the chosen allocator, then one table printed and one JSON file
written. A row is {"shape", "path", "phase", "ms", "speedup"}."""
import argparse
import contextlib

import torch

from bench_common import (MALLOC_CHOICES, MALLOC_HELP, machine_info, result_path, set_malloc,
                          warn_if_loaded, write_json)
from bench_mcs import timer


def parse_args(description, default_shapes, shapes_help, argv=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shapes", nargs="*", default=list(default_shapes), help=shapes_help)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the paths take turns "
                   "(the result is the median of the rounds' medians)")
    p.add_argument("--malloc", default="default", choices=MALLOC_CHOICES, help=MALLOC_HELP)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def shape_rows_from(shape_text, times, baseline="torch"):
    """The rows of one shape from ``time_paths``' {path: {phase: seconds}}."""
    return [{"shape": shape_text, "path": path, "phase": phase, "ms": seconds * 1e3,
             "speedup": times[baseline][phase] / seconds}
            for path in times for phase, seconds in times[path].items()]


def measure_shapes(args, shape_rows):
    """(rows, load average at the start): ``shape_rows(shape, args, measure)`` for every shape
    of ``args.shapes``, with ``args.malloc``'s allocator setting."""
    with contextlib.ExitStack() as stack:
        set_malloc(args.malloc, stack)
        measure = timer(torch.device("cpu"))
        load_at_start = warn_if_loaded()
        rows = [row for shape in args.shapes for row in shape_rows(shape, args, measure)]
    return rows, load_at_start


def report(args, rows, load_at_start, title, benchmark, default_json, shape_header):
    """Prints ``title`` and the rows as a table, writes them as JSON (``args.json`` or
    ``default_json`` under runs/bench/)."""
    print(f"{title}, median of {args.rounds} rounds of {args.iters}, malloc {args.malloc}")
    shape_width = max([len(shape_header)] + [len(r["shape"]) for r in rows])
    path_width = max([4] + [len(r["path"]) for r in rows])
    header = (f"{shape_header:>{shape_width}} {'path':>{path_width}} {'phase':>17} {'ms':>9} "
              f"{'x torch':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:>{shape_width}} {r['path']:>{path_width}} {r['phase']:>17} "
              f"{r['ms']:9.3f} {r['speedup']:8.2f}")
    out = result_path(args.json, default_json)
    write_json(out, {"benchmark": benchmark, "settings": vars(args),
                     "machine": machine_info(torch.device("cpu")),
                     "load_average_at_start": load_at_start, "rows": rows})
    print(f"\nwrote {out}")
