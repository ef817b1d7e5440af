"""Learning-rate schedules as a factor of the base rate per optimizer step (a LambdaLR)."""
import math

import torch


def lr_factor(schedule, steps_per_epoch, total_steps):
    if schedule == "cosine":
        def factor(step):
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    elif schedule == "published":
        def factor(step):  # StepLR(step_size=1 epoch, gamma=0.5)
            return 0.5 ** (step // steps_per_epoch)
    elif schedule == "constant":
        def factor(step):
            return 1.0
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    return factor


def make_scheduler(optimizer, schedule, steps_per_epoch, epochs):
    total = max(1, steps_per_epoch * epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lr_factor(schedule, steps_per_epoch, total))
