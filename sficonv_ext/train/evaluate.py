"""``sficonv eval``: metrics.json and an ROC PNG for a checkpoint on a data set."""
import os

from . import distributed, output_folder
from .cpu_memory import cpu_malloc
from .data import drop_missing
from .errors import UserError
from .evaluation import ScoringSet, failure_message, metrics_of
from .inference import load_model
from .metrics import undefined_reason
from .plots import save_roc_png
from .reporting import Reporter, summary, write_json
from .sources import evaluation_set
from .transforms import EvalTransform


def evaluate(cfg):
    for name in ("checkpoint", "data", "out"):
        if not cfg.get(name):
            raise UserError(f"eval needs --{name}")
    training_files = output_folder.run_markers_in(cfg["out"], output_folder.TRAINING_ONLY)
    if training_files:
        # eval writes metrics.json and roc.png, which would replace the training run's own.
        raise UserError(f"--out {cfg['out']} holds a training run ({', '.join(training_files)}):"
                        f" give eval a folder of its own, such as {os.path.join(cfg['out'], 'eval')}")
    ctx = distributed.setup(cfg["device"])
    try:
        with cpu_malloc(cfg["cpu_malloc"], ctx.device) as malloc_note:
            return _evaluate(cfg, ctx, malloc_note)
    finally:
        distributed.teardown(ctx)


def _evaluate(cfg, ctx, malloc_note):
    out = cfg["out"]
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    distributed.barrier(ctx)
    reporter = Reporter(ctx.is_main, out, log_name="eval.log")
    log = reporter.log
    if malloc_note:
        log(malloc_note)
    samples = evaluation_set(cfg["data"], cfg, ctx, log)
    samples, missing = drop_missing(samples, cfg["strict"], log)
    model, path = load_model(cfg["checkpoint"], cfg.get("arch"), ctx.device,
                             cfg["channels_last"], cfg["compile"], log, fuse=cfg["fuse"])
    if not samples:
        log(f"no images to evaluate in {cfg['data']}: metrics.json will hold n = 0")
    # Published test transform: no resizing unless --image-size.
    scoring = ScoringSet(samples, EvalTransform(cfg["image_size"]), cfg["batch_size"], ctx,
                         cfg["workers"], cfg["strict"], size=cfg["image_size"])
    bar = None
    if ctx.is_main and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=scoring.local_images, desc="evaluate", mininterval=1.0, leave=False)
    scored = scoring.run(model, cfg["amp"], cfg["channels_last"], bar)
    metrics = metrics_of(scored, samples)
    metrics["skipped"] += missing
    metrics["checkpoint"] = path
    metrics["data"] = cfg["data"]
    if ctx.is_main:
        warning = failure_message([f[1] for f in scored["failures"]])
        if warning:
            log(warning)
        if undefined_reason(metrics):
            log(f"note: {undefined_reason(metrics)}")
        write_json(os.path.join(out, "metrics.json"), metrics)
        roc_path = os.path.join(out, "roc.png")
        if save_roc_png(scored["labels"], scored["scores"], roc_path, "ROC", metrics["auc"]):
            log(f"wrote {roc_path}")
        log(f"{summary(metrics)}")
        log(f"wrote {os.path.join(out, 'metrics.json')}")
    distributed.barrier(ctx)
    reporter.close()
    return metrics
