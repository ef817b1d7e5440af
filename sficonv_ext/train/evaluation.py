"""Scoring a sample list and turning the scores into metrics, shared by training-time
validation and ``sficonv eval``."""
import math
import os

import numpy as np
import torch

from ..models.input_checks import MIN_INPUT_SIZE
from .errors import NonFiniteScoreError
from .images import ImageDataset, UnreadableImageError, collate, image_size
from .loop import score
from .metrics import binary_metrics, mean_probability_log_odds, video_scores
from .sampling import ListBatchSampler, shard, size_grouped_batches


def default_workers(ctx):
    """A loader process or a few, leaving cores to the training processes themselves."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return max(0, min(4, (os.cpu_count() or 1) // max(local, 1) - 1))


class ScoringSet:
    """This rank's batches of ``samples``; images of different sizes never share a batch.

    With ``size`` set, every image is brought to that size and no header is read up front;
    otherwise each header is read to group images by size, and files PIL cannot identify are
    counted as failures here.
    """

    def __init__(self, samples, transform, batch_size, ctx, workers=None, strict=False,
                 size=None):
        self.samples, self.ctx = samples, ctx
        self.header_failures = []
        if size is not None:
            sizes = [(size, size)] * len(samples)
        else:
            sizes = []
            for i, s in enumerate(samples):
                found, reason = image_size(s.path), None
                if found is None:
                    reason, message = "cannot identify image file", f"cannot read image {s.path}"
                elif min(found) < MIN_INPUT_SIZE:
                    reason = (f"image is {found[0]}x{found[1]}, smaller than the network's "
                              f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} minimum (resize it, or pass "
                              f"--image-size)")
                    message, found = f"cannot score image {s.path}: {reason}", None
                if reason is not None:
                    if strict:
                        raise UnreadableImageError(message)
                    self.header_failures.append((i, s.path, reason))
                sizes.append(found)
        batches = shard(size_grouped_batches(sizes, batch_size), ctx.world_size, ctx.rank)
        dataset = ImageDataset(samples, transform, strict=strict)
        workers = default_workers(ctx) if workers is None else workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=ListBatchSampler(batches), collate_fn=collate,
            num_workers=workers, pin_memory=ctx.device.type == "cuda")
        self.local_images = sum(len(b) for b in batches)

    def run(self, model, amp="none", channels_last=False, bar=None):
        """Scores of every sample (gathered on every rank); raises
        :class:`NonFiniteScoreError` on every rank alike if any logit is NaN or infinite."""
        scored = score(model, self.loader, self.ctx, amp, channels_last, bar)
        scored["failures"] = sorted(scored["failures"] + self.header_failures)
        bad = [i for i, m in zip(scored["indices"], scored["margins"]) if not math.isfinite(m)]
        if bad:
            # NaN would rank anywhere (and argmax calls it a class): no metric or score of
            # this model can be trusted.
            shown = ", ".join(self.samples[i].path for i in bad[:3])
            raise NonFiniteScoreError(
                f"the model gave NaN or infinite logits for {len(bad)} of "
                f"{len(scored['indices'])} image(s) ({shown}{' ...' if len(bad) > 3 else ''}):"
                f" its weights or BatchNorm statistics hold non-finite values, or --amp fp16 "
                f"overflowed")
        return scored


def metrics_of(scored, samples):
    """metrics.json content for scored samples (video-level metrics where videos exist)."""
    # Ranked by margin (see loop.score).
    metrics = binary_metrics(scored["labels"], scored["margins"], scored["predictions"])
    n = metrics["n"]
    metrics["loss"] = scored["loss_sum"] / n if n else None
    videos = [samples[i].video for i in scored["indices"]]
    if n and all(v is not None for v in videos):
        # A video is scored by its frames' mean probability, ranked by that mean's log-odds
        # (from the margins: the mean itself rounds to 1.0 for confident videos).
        _, labels, log_odds = video_scores(videos, scored["labels"], scored["margins"],
                                           reduce=mean_probability_log_odds)
        metrics["video"] = binary_metrics(labels, log_odds, (log_odds > 0).astype(np.int64))
    metrics["skipped"] = len(scored["failures"])
    return metrics


def failure_message(paths):
    """A log line for images that could not be read or were too small (None if none)."""
    if not paths:
        return None
    shown = ", ".join(paths[:3])
    more = " ..." if len(paths) > 3 else ""
    return f"warning: skipped {len(paths)} unreadable or too small image(s): {shown}{more}"
