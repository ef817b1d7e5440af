"""The inner loops: one training epoch (resumable at any optimizer step) and scoring a data
set."""
import contextlib
import math
import time
import warnings

import torch
import torch.nn.functional as F

from ..cpu_allocator import trim_kernel_pool, trim_large_block_cache
from . import distributed
from .errors import NonFiniteLossError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, amp):
    if amp in (None, "none"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def classification_loss(logits, labels):
    """Summed cross-entropy (the caller divides by the global batch size)."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@contextlib.contextmanager
def scheduler_order_warning_silenced():
    """Around a whole training run (once: ``catch_warnings`` on every step would reset the
    warnings registry and repeat every other once-only warning): the schedule counts every step
    taken, including one the fp16 grad scaler skipped (an overflow), which keeps it a function
    of the step number, as resuming needs. Torch warns about exactly that case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                r"before `optimizer\.step\(\)`")
        yield


def apply_update(optimizer, scaler, scheduler):
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


class EpochTotals:
    """Running sums of one epoch, kept in mid-epoch checkpoints so a resumed epoch reports the
    same loss as an uninterrupted one."""

    def __init__(self, loss_sum=0.0, images=0, skipped=0):
        self.loss_sum, self.images, self.skipped = loss_sum, images, skipped

    def state_dict(self):
        return {"loss_sum": self.loss_sum, "images": self.images, "skipped": self.skipped}

    @property
    def mean_loss(self):
        return self.loss_sum / self.images if self.images else float("nan")


def train_epoch(run, epoch, start_step, totals, on_step):
    """Train ``run`` (a :class:`trainer.Run`) over one epoch from ``start_step``.

    ``on_step(step_done)`` runs after every optimizer step (mid-epoch checkpoints).
    Raises :class:`NonFiniteLossError` before applying an update whose loss is not finite.
    """
    ctx, cfg, plan = run.ctx, run.cfg, run.plan
    run.model.train()
    loader = run.train_loader(epoch, start_step)
    batches = iter(loader)
    bar = run.progress_bar(total=plan.steps_per_epoch, initial=start_step,
                           desc=f"epoch {epoch + 1}/{cfg['epochs']}")
    failures_seen = []
    window_images, window_start = 0, time.perf_counter()
    for step in range(start_step, plan.steps_per_epoch):
        loss_sum, images, skipped = 0.0, 0, 0
        for micro in range(plan.accum_steps):
            batch = next(batches)
            # Each unreadable image once, as the sample it was requested as (a run of unreadable
            # images fails again while standing in for the one before it).
            own = [f.path for f in batch.failures if f.requested]
            skipped += len(own)
            failures_seen += own
            x = to_device(batch.images, ctx.device, cfg["channels_last"])
            y = batch.labels.to(ctx.device, non_blocking=True)
            sync = (micro == plan.accum_steps - 1) or not ctx.distributed
            with contextlib.nullcontext() if sync else run.train_model.no_sync():
                with autocast(ctx.device, cfg["amp"]):
                    logits = run.train_model(x)
                loss = classification_loss(logits, y)
                # DDP averages gradients over ranks: scale so the result is the mean over the
                # whole global batch.
                scaled = loss * (ctx.world_size / plan.batch_size)
                run.scaler.scale(scaled).backward()
            loss_sum += loss.detach().double()
            images += y.numel()
        loss_sum, images, skipped = distributed.all_sum(ctx, [float(loss_sum), images, skipped])
        global_step = run.global_step + 1
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_sum}) at epoch {epoch + 1}, step {step + 1} "
                f"(global step {global_step}); the update was not applied and no checkpoint was "
                f"written after it")
        apply_update(run.optimizer, run.scaler, run.scheduler)
        run.global_step = global_step
        totals.loss_sum += loss_sum
        totals.images += int(images)
        totals.skipped += int(skipped)
        window_images += int(images)
        elapsed = time.perf_counter() - window_start
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{totals.mean_loss:.4f}",
                            img_s=f"{window_images / max(elapsed, 1e-9):.0f}", refresh=False)
        on_step(step + 1)
    if bar is not None:
        bar.close()
    return failures_seen


@torch.no_grad()
def score(model, loader, ctx, amp="none", channels_last=False, bar=None):
    """Score every batch of ``loader`` (this rank's share); gather across ranks.

    Returns ``dict(indices, scores, margins, predictions, labels, loss_sum, failures)`` with
    lists sorted by sample index: ``scores`` the probability of fake, ``margins`` the logit
    difference fake - real (the same order, without float rounding to 0 or 1).
    """
    model.eval()
    rows, failures, loss_sum = [], [], 0.0
    last_shape = None
    for batch in loader:
        failures += [(f.index, f.path, f.reason) for f in batch.failures]
        if batch.labels.numel():
            shape = tuple(batch.images.shape)
            if ctx.device.type == "cpu" and last_shape not in (None, shape):
                # Under --cpu-malloc cache, blocks kept for the last batch size fit no request
                # of this one (images of native sizes): give them back instead of holding up to
                # twice the peak. The same for the kernel pool (always on), which matches blocks
                # by exact size. No-ops when nothing is held.
                trim_large_block_cache()
                trim_kernel_pool()
            last_shape = shape
            x = to_device(batch.images, ctx.device, channels_last)
            with autocast(ctx.device, amp):
                logits = model(x)
            logits = logits.float()
            labels = batch.labels.to(ctx.device)
            if (labels >= 0).all():
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            # Ranked by the logit margin: a float32 softmax is exactly 1.0 beyond a margin of
            # about 17, which would tie every confident fake with every confident false
            # positive. The probability (softmax of class 1 = sigmoid of the margin) is kept
            # in float64.
            margins = (logits[:, 1].double() - logits[:, 0].double()).cpu()
            probs = torch.sigmoid(margins).tolist()
            preds = logits.argmax(dim=1).cpu().tolist()
            rows += list(zip(batch.indices.tolist(), probs, margins.tolist(), preds,
                             batch.labels.tolist()))
        if bar is not None:
            bar.update(batch.labels.numel() + len(batch.failures))
    if bar is not None:
        bar.close()
    rows = sorted(distributed.gather_lists(ctx, rows))
    failures = sorted(distributed.gather_lists(ctx, failures))
    loss_sum = distributed.all_sum(ctx, [loss_sum])[0]
    return {"indices": [r[0] for r in rows], "scores": [r[1] for r in rows],
            "margins": [r[2] for r in rows], "predictions": [r[3] for r in rows],
            "labels": [r[4] for r in rows], "loss_sum": loss_sum, "failures": failures}
