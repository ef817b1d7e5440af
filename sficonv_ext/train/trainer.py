"""``sficonv train``: set up a run (or resume one), train epoch by epoch, validate, checkpoint."""
import contextlib
import os
import random
import sys
import time

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed, output_folder
from . import builtin_data
from .architectures import build_model
from .config import (BY_NAME, FIXED_ON_RESUME, LOWER_IS_BETTER, PATH_OPTIONS,
                     absolute_path_option, convert)
from .cpu_features import amp_hint
from .cpu_memory import cpu_malloc
from .data import HOLDOUT_VERSION, class_counts, holdout_changed_since
from .errors import DataError, NonFiniteError, UserError
from .evaluation import ScoringSet, default_workers, failure_message, metrics_of
from .images import ImageDataset, collate
from .loop import EpochTotals, scheduler_order_warning_silenced, train_epoch
from .metrics import undefined_reason
from .plots import save_roc_png
from .reporting import Reporter, flat_metrics, summary, write_atomic_text, write_json
from .sampling import ListBatchSampler, TrainPlan
from .schedules import make_scheduler
from .sources import training_sets
from .transforms import TrainTransform, validation_transform

# Settings of this invocation, not of the run: never saved, never taken from a resumed run
# (progress follows whether this process's standard error is a terminal).
NOT_SAVED = ("resume", "overwrite", "config", "progress")


@contextlib.contextmanager
def determinism(enabled, device):
    """Deterministic kernels for the run, and the previous global settings back afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (adaptive average pooling, max pooling) have
        # no deterministic version; erroring would make --deterministic unusable on GPUs.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def merge_resume(saved, explicit):
    """The saved run's configuration with the options given now; refuse changes that would make
    a different run."""
    cfg = dict(saved)
    cfg.pop("out", None)  # a resumed run writes where it is told, by default beside its checkpoint
    for name, value in explicit.items():
        value = absolute_path_option(name, value)
        if (name in FIXED_ON_RESUME and name in saved
                and absolute_path_option(name, saved[name]) != value):
            raise UserError(f"cannot change --{name.replace('_', '-')} when resuming (the run "
                            f"used {saved[name]!r}, now {value!r}); start a new run instead")
        cfg[name] = value
    for name, option in BY_NAME.items():
        if "train" in option.commands and name not in cfg:
            cfg[name] = option.default
    return cfg


def _agree(ctx, action):
    """Run ``action`` on rank 0 and raise its UserError on every rank (no rank left waiting)."""
    message = None
    if ctx.is_main:
        try:
            action()
        except UserError as exc:
            message = str(exc)
    message = distributed.broadcast_object(ctx, message)
    if message is not None:
        raise UserError(message)


class Run:
    """Everything one training process holds; the loops in :mod:`.loop` work on it."""

    def __init__(self, cfg, ctx, reporter):
        self.cfg, self.ctx, self.reporter = cfg, ctx, reporter
        self.global_step = 0
        self.history, self.best = [], None
        self.missing_val = 0  # validation images named but not there (see validate)

    # -- set-up -------------------------------------------------------------------------------
    def build(self, train_samples):
        cfg, ctx = self.cfg, self.ctx
        self.plan = TrainPlan(len(train_samples), cfg["batch_size"], cfg["seed"],
                              ctx.world_size, ctx.rank, cfg["accum_steps"])
        self.train_dataset = ImageDataset(train_samples,
                                          TrainTransform(cfg["image_size"], cfg["augment"]),
                                          seed=cfg["seed"], strict=cfg["strict"],
                                          substitute=True)
        self.workers = default_workers(ctx) if cfg["workers"] is None else cfg["workers"]
        seed_everything(cfg["seed"])
        model = build_model(cfg["arch"], cfg["mcs_learnable"], cfg["mcs_init"])
        model.to(ctx.device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        # fused=True: one kernel over every parameter, the same update up to rounding. On the
        # 2-core test CPU one step over SFIConv-ResNet-26's 14M parameters took 12.1 ms against
        # 35.5 ms for PyTorch's default Adam (2026-11-27), and the 64 px, batch-32 train step
        # went from 315 to 299 ms.
        # A run resumed from a checkpoint written before takes this implementation too
        # (_with_this_adam).
        fused = {"fused": True} if ctx.device.type in ("cpu", "cuda") else {}
        self.optimizer = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=cfg["weight_decay"], **fused)
        self.scheduler = make_scheduler(self.optimizer, cfg["lr_schedule"],
                                        self.plan.steps_per_epoch, cfg["epochs"])
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg["amp"] == "fp16")

    def wrap(self):
        model = self.model
        if self.ctx.distributed:
            # The published MCSConv filter is frozen (requires_grad False), so every parameter
            # DDP tracks receives a gradient and unused-parameter search is not needed.
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda"
                else None, find_unused_parameters=False)
        if self.cfg["compile"]:
            model = torch.compile(model)
        self.train_model = model

    def train_loader(self, epoch, start_step):
        batches = ListBatchSampler(self.plan.micro_batches(epoch, start_step))
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=batches, collate_fn=collate,
            num_workers=self.workers, pin_memory=self.ctx.device.type == "cuda")

    def progress_bar(self, **kwargs):
        if not (self.ctx.is_main and self.cfg["progress"]):
            return None
        from tqdm import tqdm
        return tqdm(mininterval=1.0, dynamic_ncols=True, file=sys.stderr, leave=False,
                    **kwargs)

    # -- checkpoints ----------------------------------------------------------------------------
    def payload(self, epoch, step, totals, full=True):
        state = {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "arch": self.cfg["arch"],
            "model_options": {"mcs_learnable": self.cfg["mcs_learnable"],
                              "mcs_init": self.cfg["mcs_init"]},
            "model": self.model.state_dict(),
            "progress": {"epoch": epoch, "step": step, "global_step": self.global_step,
                         "steps_per_epoch": self.plan.steps_per_epoch,
                         "num_samples": self.plan.num_samples,
                         "totals": totals.state_dict()},
            "best": self.best, "history": self.history,
            # Which validation split of --data builtin the run used (see builtin_data).
            "builtin_split": (builtin_data.SPLIT_VERSION if self.cfg["data"] == "builtin"
                              else None),
            # Which version of hold_out split --data, when the run held out its validation.
            "holdout_split": (HOLDOUT_VERSION if self.cfg["data"] != "builtin"
                              and self.cfg.get("val_data") is None else None),
            "config": {k: v for k, v in self.cfg.items() if k not in NOT_SAVED},
        }
        if full:
            state.update(optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), rng=ckpt.rng_state())
        return state

    def save(self, name, epoch, step, totals, full=True):
        if self.ctx.is_main:
            ckpt.atomic_save(self.payload(epoch, step, totals, full),
                             os.path.join(self.cfg["out"], name))

    def _with_this_adam(self, saved):
        """``saved`` (an optimizer state_dict) with this run's Adam implementation in its groups.
        load_state_dict restores the saved groups' "fused"/"foreach" too, but the optimizer
        was built for its own: a checkpoint written before Adam was fused, resumed with fp16
        AMP, had GradScaler hand the unfused step the arguments only the fused one takes."""
        ours = self.optimizer.param_groups[0]
        groups = [{**group, "fused": ours.get("fused"), "foreach": ours.get("foreach")}
                  for group in saved["param_groups"]]
        return {**saved, "param_groups": groups}

    def restore(self, state, path):
        progress = state["progress"]
        if (progress["num_samples"] != self.plan.num_samples
                or progress["steps_per_epoch"] != self.plan.steps_per_epoch):
            raise UserError(f"the training set changed since {path} was written "
                            f"({progress['num_samples']} images then, {self.plan.num_samples} "
                            f"now): resuming would not continue the same run")
        ckpt.load_into(self.model, state["model"], path)
        self.optimizer.load_state_dict(self._with_this_adam(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer kept the old schedule's rate: with another --epochs the next step must
        # take this schedule's rate at the step reached (the same number when nothing changed).
        step_reached = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step_reached)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.global_step = progress["global_step"]
        self.best, self.history = state["best"], list(state["history"])
        return progress["epoch"], progress["step"], EpochTotals(**progress["totals"])

    # -- validation -----------------------------------------------------------------------------
    def validate(self, val_set, val_samples, epoch):
        bar = self.progress_bar(total=val_set.local_images, desc=f"validate {epoch + 1}")
        scored = val_set.run(self.model, self.cfg["amp"], self.cfg["channels_last"], bar)
        metrics = metrics_of(scored, val_samples)
        # Validation images named but not there were dropped before scoring: counted, as eval
        # counts them.
        metrics["skipped"] += self.missing_val
        warning = failure_message([f[1] for f in scored["failures"]])
        if warning:
            self.reporter.log(warning)
        return metrics, scored

    def improved(self, metrics):
        name = self.cfg["best_metric"]
        value = metrics.get(name)
        if value is None:
            return False
        if self.best is None:
            return True
        if name in LOWER_IS_BETTER:
            return value < self.best["value"]
        return value > self.best["value"]


def _load_resume(path):
    if os.path.isdir(path):
        path = os.path.join(path, ckpt.LAST)
    state, path = ckpt.load_file(path)
    if not ckpt.is_training_checkpoint(state) or "optimizer" not in state:
        raise UserError(f"{path} is not a resumable training checkpoint (last.pt of a run)")
    return state, path


def resolve_run_config(cfg, explicit):
    """Configuration for a new or resumed run; returns ``(cfg, resume_state, resume_path)``."""
    state = path = None
    if cfg.get("resume"):
        state, path = _load_resume(cfg["resume"])
        progress = cfg.get("progress")
        cfg = merge_resume(state["config"], explicit)
        cfg["resume"], cfg["progress"] = path, progress
        if not cfg.get("out"):
            cfg["out"] = os.path.dirname(path)
    for name in PATH_OPTIONS:
        cfg[name] = absolute_path_option(name, cfg.get(name))
    if state is not None:
        _check_resumable(state, path, cfg)
    if not cfg.get("data"):
        raise UserError("train needs --data (a list file, a folder, or 'builtin')")
    if not cfg.get("out"):
        raise UserError("train needs --out DIR")
    if cfg["image_size"] is None:
        raise UserError("train needs an --image-size")
    for name in ("epochs", "batch_size", "lr"):
        convert(BY_NAME[name], cfg[name], "option")
    return cfg, state, path


def _check_resumable(state, path, cfg):
    """Refuse a resume that would not continue the same run (before anything is written)."""
    done, step = state["progress"]["epoch"], state["progress"]["step"]
    if done > cfg["epochs"]:
        raise UserError(f"{path} has trained {done} epochs, more than --epochs {cfg['epochs']}: "
                        f"give --epochs {done} or more")
    if done == cfg["epochs"] and step > 0:
        # Stopped inside epoch done + 1: ending at --epochs done would report a model trained
        # part of an epoch further as epoch done's.
        raise UserError(f"{path} stopped inside epoch {done + 1} (step {step}), after "
                        f"--epochs {cfg['epochs']}: give --epochs {done + 1} or more")
    if cfg.get("data") == "builtin":
        builtin_data.check_split_version(state.get("builtin_split"), path, "resume it")
    elif (cfg.get("val_data") is None and state.get("holdout_split") != HOLDOUT_VERSION
          and holdout_changed_since(state.get("holdout_split"), cfg["data"])):
        # Only data whose split changed is refused (a folder without subfolders, or a
        # FaceForensics++ tree of per-video folders, splits as it did).
        raise UserError(f"{path} held out its validation images from {cfg['data']} with an "
                        f"earlier version of the split, which would now hold out other images "
                        f"(some it trained on): it cannot be resumed; train a new run")


def train(cfg, explicit):
    """Run ``sficonv train``; returns the final metrics (rank 0) or None."""
    cfg, resume_state, resume_path = resolve_run_config(cfg, explicit)
    ctx = distributed.setup(cfg["device"])
    try:
        with determinism(cfg["deterministic"], ctx.device), \
                cpu_malloc(cfg["cpu_malloc"], ctx.device) as malloc_note, \
                scheduler_order_warning_silenced():
            return _train(cfg, ctx, resume_state, resume_path, malloc_note)
    finally:
        distributed.teardown(ctx)


def _train(cfg, ctx, resume_state, resume_path, malloc_note):
    out = cfg["out"]
    # realpath: the run's own folder named through a link must not count as another folder
    # (--overwrite would then delete the checkpoints being resumed).
    resuming_here = resume_path is not None and (os.path.realpath(os.path.dirname(resume_path))
                                                 == os.path.realpath(out))
    output_folder.refuse_inside_data(out, cfg["data"], cfg.get("val_data"))
    _agree(ctx, lambda: output_folder.prepare(out, resuming_here, cfg["overwrite"]))
    distributed.barrier(ctx)
    reporter = Reporter(ctx.is_main, out, tensorboard=True)
    log = reporter.log
    if malloc_note:
        log(malloc_note)
    hint = amp_hint(cfg["amp"], ctx.device)
    if hint:
        log(hint)
    if ctx.is_main:
        import yaml
        saved = {k: v for k, v in cfg.items() if k not in NOT_SAVED}
        write_atomic_text(os.path.join(out, "config.yaml"),
                          output_folder.CONFIG_HEADER + "\n" + yaml.safe_dump(saved,
                                                                              sort_keys=True))
    try:
        train_samples, val_samples, _, missing_val = training_sets(cfg, ctx, log)
        if not train_samples:
            raise DataError(f"the training set from {cfg['data']} is empty: no images to train "
                            f"on")
        real, fake = class_counts(train_samples)
        if not real or not fake:
            # A misspelt real/ or fake/ folder would otherwise train a one-class "detector"
            # with perfect accuracy.
            raise DataError(f"the training set from {cfg['data']} has no "
                            f"{'real' if not real else 'fake'} images ({real} real, {fake} "
                            f"fake): a detector needs both (label 0 real, 1 fake)")
        run = Run(cfg, ctx, reporter)
        run.missing_val = missing_val
        run.build(train_samples)
        epoch, start_step, totals = 0, 0, EpochTotals()
        if resume_state is not None:
            epoch, start_step, totals = run.restore(resume_state, resume_path)
            log(f"resumed {resume_path}: epoch {epoch + 1}, step {start_step} "
                f"(global step {run.global_step})")
            if ctx.is_main:
                _bring_best(resume_state, resume_path, resuming_here, run, log)
        run.wrap()
        return _epochs(run, train_samples, val_samples, epoch, start_step, totals)
    except (UserError, NonFiniteError) as exc:
        reporter.log_to_file(f"error: {exc}")  # train.log then says why the run stopped
        raise
    except KeyboardInterrupt:
        reporter.log_to_file("interrupted (Ctrl-C); the last checkpoint written is kept")
        raise
    finally:
        reporter.close()


def _recorded_best(path):
    """The ``best`` record of the checkpoint at ``path``; None if it is missing or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        state, _ = ckpt.load_file(path)
    except UserError:
        return None
    return state.get("best") if isinstance(state, dict) else None


def _bring_best(resume_state, resume_path, resuming_here, run, log):
    """Make the output folder's best.pt the resumed run's recorded best.

    Into another folder: copy the run's best.pt and history, and the checkpoint resumed from as
    last.pt, so the new folder is a whole run (which --resume takes in turn) even if no later
    epoch does better, or none is left to train. In either folder: an epoch's last.pt is
    written before its best.pt, so a run stopped between the two has a last.pt whose best is
    its own weights and an older best.pt: best.pt is then written again from last.pt."""
    out = run.cfg["out"]
    if not resuming_here:
        run.reporter.history_csv(run.history)
        ckpt.atomic_copy(resume_path, os.path.join(out, ckpt.LAST))
    if not run.best:
        return
    source = os.path.join(os.path.dirname(os.path.abspath(resume_path)), ckpt.BEST)
    if _recorded_best(source) == run.best:
        if not resuming_here:
            ckpt.atomic_copy(source, os.path.join(out, ckpt.BEST))
            log(f"copied {source} (best so far, epoch {run.best['epoch']}) into {out}")
        return
    progress = resume_state["progress"]
    if progress["step"] == 0 and progress["epoch"] == run.best["epoch"]:
        run.save(ckpt.BEST, progress["epoch"], 0, EpochTotals(**progress["totals"]), full=False)
        log(f"wrote {os.path.join(out, ckpt.BEST)} (best so far, epoch {run.best['epoch']}) "
            f"from {resume_path}: the run had stopped before writing it")
    else:
        log(f"warning: no best.pt of epoch {run.best['epoch']} (the run's recorded best) beside "
            f"{resume_path}, and its weights are not in it: {out} has no best.pt until an epoch "
            f"does better than {run.best['metric']} {run.best['value']:.4g}")


def _dropped_note(num_samples, plan):
    left_out = num_samples - plan.steps_per_epoch * plan.batch_size
    if left_out <= 0:
        return ""
    return (f" ({left_out} image(s) left out of each epoch: the incomplete last batch is "
            f"dropped, and which images fall there changes every epoch)")


def _epochs(run, train_samples, val_samples, first_epoch, start_step, totals):
    cfg, ctx, log = run.cfg, run.ctx, run.reporter.log
    real, fake = class_counts(train_samples)
    log(f"training {cfg['arch']} on {len(train_samples)} images ({real} real, {fake} fake), "
        f"validating on {len(val_samples)}; {ctx.world_size} process(es) on {ctx.device}; "
        f"batch {run.plan.batch_size}, {run.plan.steps_per_epoch} "
        f"step{'s' if run.plan.steps_per_epoch != 1 else ''} per epoch"
        + _dropped_note(len(train_samples), run.plan))
    val_set = None
    if val_samples:
        val_set = ScoringSet(val_samples, validation_transform(cfg["image_size"], cfg["augment"]),
                             max(1, cfg["batch_size"] // ctx.world_size), ctx, run.workers,
                             cfg["strict"], size=cfg["image_size"])
    else:
        log("the validation set is empty: no validation metrics, and best.pt is not chosen")
    last_save = time.monotonic()

    def on_step(epoch, step_done):
        nonlocal last_save
        if step_done == run.plan.steps_per_epoch:
            return  # the end-of-epoch checkpoint follows
        by_steps = cfg["save_every_steps"] and run.global_step % cfg["save_every_steps"] == 0
        by_time = (cfg["save_every_minutes"]
                   and time.monotonic() - last_save >= 60 * cfg["save_every_minutes"])
        if by_steps or by_time:
            run.save(ckpt.LAST, epoch, step_done, totals)
            last_save = time.monotonic()

    final = None
    for epoch in range(first_epoch, cfg["epochs"]):
        started = time.perf_counter()
        done_before = totals.images
        failures = train_epoch(run, epoch, start_step, totals, lambda s: on_step(epoch, s))
        seconds = time.perf_counter() - started
        if totals.skipped:
            # The epoch's count (history.csv's), even when this process saw only the part of
            # the epoch since a resume; the paths it saw as examples.
            shown = f": {', '.join(failures[:3])}{' ...' if len(failures) > 3 else ''}" \
                if failures else ""
            log(f"warning: skipped {totals.skipped} unreadable or too small image(s) in epoch "
                f"{epoch + 1}{shown}")
        row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
               "train_loss": totals.mean_loss, "train_images": totals.images,
               "skipped": totals.skipped, "seconds": round(seconds, 3),
               "images_per_s": round((totals.images - done_before) / max(seconds, 1e-9), 2)}
        metrics = None
        distributed.sync_buffers(ctx, run.model)
        if val_set is not None:
            metrics, scored = run.validate(val_set, val_samples, epoch)
            row.update(flat_metrics(metrics))
            final = (metrics, scored)
        improved = metrics is not None and run.improved(metrics)
        if improved:
            name = cfg["best_metric"]
            run.best = {"metric": name, "value": metrics[name], "epoch": epoch + 1}
        run.history.append(row)
        totals = EpochTotals()
        run.save(ckpt.LAST, epoch + 1, 0, totals)
        if improved:
            run.save(ckpt.BEST, epoch + 1, 0, totals, full=False)
        distributed.barrier(ctx)
        last_save = time.monotonic()
        run.reporter.history_csv(run.history)
        run.reporter.scalars(epoch + 1, row)
        log(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}, "
            f"{row['images_per_s']:.0f} img/s"
            + (f"; val {summary(metrics)}" if metrics else ""))
        if metrics is not None and undefined_reason(metrics):
            log(f"note: {undefined_reason(metrics)}")
        start_step = 0
    distributed.sync_buffers(ctx, run.model)
    if val_set is not None and final is None:
        # Resumed a run whose epochs were all done: validate the final model again.
        final = run.validate(val_set, val_samples, cfg["epochs"] - 1)
    return _finish(run, final)


def _finish(run, final):
    cfg, out, log = run.cfg, run.cfg["out"], run.reporter.log
    result = None
    if run.ctx.is_main:
        if final is not None:
            metrics, scored = final
            result = dict(metrics)
        else:
            result = {"acc": None, "auc": None, "ap": None, "eer": None,
                      "tpr_at_fpr": {"1e-2": None, "1e-3": None, "1e-4": None}, "n": 0}
        result["epoch"] = cfg["epochs"]
        result["best"] = run.best
        write_json(os.path.join(out, "metrics.json"), result)
        if final is not None and save_roc_png(scored["labels"], scored["margins"],
                                              os.path.join(out, "roc.png"),
                                              f"validation ROC, {cfg['arch']}",
                                              result["auc"]):
            log(f"wrote {os.path.join(out, 'roc.png')}")
        if cfg["export_published"] != "none":
            source = os.path.join(out, ckpt.BEST if run.best else ckpt.LAST)
            state, _ = ckpt.load_file(source)
            model = build_model(cfg["arch"], cfg["mcs_learnable"], cfg["mcs_init"])
            ckpt.load_into(model, state["model"], source)
            target = os.path.join(out, "best_published.pkl")
            ckpt.export_published(model, target, cfg["export_published"])
            log(f"wrote {target} ({cfg['export_published']} layout of {source})")
        log(f"final validation: {summary(result)}" if result["n"] else
            "no validation metrics")
        log(f"wrote {os.path.join(out, 'metrics.json')}")
    distributed.barrier(run.ctx)
    return result
