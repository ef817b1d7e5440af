"""``sficonv predict``: one ``path,score,margin`` row per image (score = probability of fake,
margin = fake logit minus real logit)."""
import csv
import io
import os
import sys

import torch

from .cpu_memory import cpu_malloc
from .data import Sample, images_under
from .errors import UserError
from .evaluation import ScoringSet, failure_message
from .distributed import Context, resolve_device
from .inference import load_model
from .reporting import Reporter, write_atomic_text
from .transforms import EvalTransform


def expand_inputs(inputs, strict, log):
    """Images named directly, and every image under named folders (path as given joined with
    the path inside the folder). Missing inputs are skipped and counted (``strict``: error).
    An image reached twice (named twice, inside a folder also named, through a link) is scored
    once, under the path that reached it first."""
    paths, missing, seen, repeats = [], [], set(), 0
    for given in inputs:
        if os.path.isdir(given):
            found = images_under(given)  # joined onto the folder as given
        elif os.path.isfile(given):
            found = [given]
        else:
            missing.append(given)
            continue
        for path in found:
            real = os.path.realpath(path)
            if real in seen:
                repeats += 1
                continue
            seen.add(real)
            paths.append(path)
    if missing:
        if strict:
            raise UserError(f"input not found: {missing[0]}")
        log(f"warning: skipped {len(missing)} missing input(s): {', '.join(missing[:3])}"
            + (" ..." if len(missing) > 3 else ""))
    if repeats:
        log(f"note: {repeats} image(s) reached more than once are scored once")
    return paths


def predict(cfg, inputs):
    if not cfg.get("checkpoint"):
        raise UserError("predict needs --checkpoint")
    if not cfg.get("out"):
        raise UserError("predict needs --out FILE.csv")
    if cfg["out"] != "-" and os.path.isdir(cfg["out"]):
        # Refused before scoring, not after it when the CSV cannot be written.
        raise UserError(f"--out {cfg['out']} is a folder: give a file name such as "
                        f"{os.path.join(cfg['out'], 'scores.csv')}")
    if not inputs:
        raise UserError("predict needs at least one image or folder")
    ctx = Context(device=resolve_device(cfg["device"]))
    to_stdout = cfg["out"] == "-"
    log = Reporter(True, stream=sys.stderr if to_stdout else None).log  # stdout holds the CSV
    with cpu_malloc(cfg["cpu_malloc"], ctx.device):  # silent: stdout may be piped
        return _predict(cfg, inputs, ctx, log, to_stdout)


def _predict(cfg, inputs, ctx, log, to_stdout):
    paths = expand_inputs(inputs, cfg["strict"], log)
    if not paths:
        raise UserError(f"no images found in {', '.join(inputs)}")
    model, _ = load_model(cfg["checkpoint"], cfg.get("arch"), ctx.device,
                          cfg["channels_last"], cfg["compile"], log, fuse=cfg["fuse"])
    samples = [Sample(p, -1) for p in paths]
    scoring = ScoringSet(samples, EvalTransform(cfg["image_size"]), cfg["batch_size"], ctx,
                         cfg["workers"], cfg["strict"], size=cfg["image_size"])
    bar = None
    if cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=len(samples), desc="predict", unit="img", mininterval=1.0, leave=False)
    with torch.inference_mode():
        scored = scoring.run(model, cfg["amp"], cfg["channels_last"], bar)
    warning = failure_message([f[1] for f in scored["failures"]])
    if warning:
        log(warning)
    if not scored["indices"]:
        raise UserError(f"no image of the {len(paths)} found could be scored (see the "
                        f"warning above); nothing written")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    # margin: the fake logit minus the real one. The score (its sigmoid) saturates at 1 for
    # confident fakes, in float64 beyond a margin of about 37; the margin keeps their order.
    writer.writerow(["path", "score", "margin"])
    for index, value, margin in zip(scored["indices"], scored["scores"], scored["margins"]):
        writer.writerow([paths[index], repr(float(value)), repr(float(margin))])
    _write_csv(cfg["out"], buffer.getvalue())
    log(f"wrote {len(scored['indices'])} scores to "
        f"{'standard output' if to_stdout else cfg['out']}")
    return scored


def _write_csv(target, text):
    """``-``: standard output. An existing target that is not a regular file (a terminal, a
    pipe, a link to /dev/stdout): written in place, never replaced. Else atomically."""
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if os.path.exists(target) and not os.path.isdir(target) and not os.path.isfile(target):
        with open(target, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        return
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    write_atomic_text(target, text)
