"""``sficonv eval``: metrics.json and an ROC PNG for a checkpoint on a data set."""
import os

from . import builtin_data
from . import checkpoint as ckpt
from . import distributed, output_folder
from .cpu_memory import cpu_malloc
from .data import drop_missing
from .errors import NonFiniteError, UserError
from .evaluation import ScoringSet, failure_message, metrics_of
from .inference import load_model
from .metrics import undefined_reason
from .plots import save_roc_png
from .reporting import Reporter, summary, write_json
from .sources import evaluation_set
from .transforms import EvalTransform


def evaluate(cfg, explicit=None):
    """Run ``sficonv eval``. ``explicit``: the options given on the command line or in YAML
    (the others may come from the checkpoint's run, see :func:`builtin_settings`)."""
    for name in ("checkpoint", "data", "out"):
        if not cfg.get(name):
            raise UserError(f"eval needs --{name}")
    output_folder.refuse_inside_data(cfg["out"], cfg["data"])
    training_files = output_folder.run_markers_in(cfg["out"], output_folder.TRAINING_ONLY)
    if training_files:
        # eval writes metrics.json and roc.png, which would replace the training run's own.
        raise UserError(f"--out {cfg['out']} holds a training run ({', '.join(training_files)}):"
                        f" give eval a folder of its own, such as "
                        f"{os.path.join(cfg['out'], 'eval')}")
    ctx = distributed.setup(cfg["device"])
    try:
        with cpu_malloc(cfg["cpu_malloc"], ctx.device) as malloc_note:
            return _evaluate(cfg, ctx, malloc_note, explicit or {})
    finally:
        distributed.teardown(ctx)


def builtin_settings(cfg, explicit, checkpoint, log):
    """``cfg`` for ``--data builtin``: the built-in set's size and image side of the run that
    wrote ``checkpoint`` (a loaded object) unless given now, so that eval scores that run's
    validation split, never its training images."""
    run = checkpoint.get("config") if ckpt.is_training_checkpoint(checkpoint) else None
    if not isinstance(run, dict) or run.get("data") != "builtin":
        return cfg
    builtin_data.check_split_version(checkpoint.get("builtin_split"), cfg["checkpoint"],
                                     "evaluate it")
    cfg = dict(cfg)
    taken = []
    if "builtin_images" not in explicit and run.get("builtin_images"):
        cfg["builtin_images"] = run["builtin_images"]
        taken.append(f"{cfg['builtin_images']} images")
    if "image_size" not in explicit and run.get("image_size"):
        cfg["builtin_image_size"] = run["image_size"]
        taken.append(f"{run['image_size']} px")
    if "cache_dir" not in explicit and run.get("cache_dir"):
        cfg["cache_dir"] = run["cache_dir"]
    if taken:
        log(f"--data builtin: the checkpoint's training run's set ({', '.join(taken)})")
    return cfg


def _evaluate(cfg, ctx, malloc_note, explicit):
    out = cfg["out"]
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    distributed.barrier(ctx)
    reporter = Reporter(ctx.is_main, out, log_name="eval.log")
    try:
        return _score(cfg, ctx, malloc_note, explicit, out, reporter)
    except (UserError, NonFiniteError) as exc:
        reporter.log_to_file(f"error: {exc}")  # eval.log then says why it stopped
        raise
    finally:
        reporter.close()


def _score(cfg, ctx, malloc_note, explicit, out, reporter):
    log = reporter.log
    if malloc_note:
        log(malloc_note)
    loaded = ckpt.load_file(cfg["checkpoint"])
    if cfg["data"] == "builtin":
        cfg = builtin_settings(cfg, explicit, loaded[0], log)
    samples = evaluation_set(cfg["data"], cfg, ctx, log)
    samples, missing = drop_missing(samples, cfg["strict"], log)
    model, path = load_model(cfg["checkpoint"], cfg.get("arch"), ctx.device,
                             cfg["channels_last"], cfg["compile"], log, fuse=cfg["fuse"],
                             loaded=loaded)
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
        if save_roc_png(scored["labels"], scored["margins"], roc_path, "ROC", metrics["auc"]):
            log(f"wrote {roc_path}")
        log(f"{summary(metrics)}")
        log(f"wrote {os.path.join(out, 'metrics.json')}")
    distributed.barrier(ctx)
    if metrics["n"] == 0:
        # As predict: an evaluation that scored nothing is not a success (a script reading
        # the exit status would take the empty metrics.json for a result).
        raise UserError(f"no image of {cfg['data']} could be scored ({metrics['skipped']} "
                        f"skipped); metrics.json holds n = 0")
    return metrics
