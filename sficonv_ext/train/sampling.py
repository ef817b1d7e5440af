"""Which samples go into which batch: a resumable training plan and size-grouped eval batches."""
from collections import OrderedDict

import numpy as np

from .errors import UserError


class TrainPlan:
    """The batches of one training epoch, as a pure function of (seed, epoch).

    ``batch_size`` is the global batch of one optimizer step. It is split into
    ``world_size * accum_steps`` micro-batches; rank r takes micro-batch ``a * world_size + r``
    for accumulation step a. The incomplete last batch is dropped (a data set smaller than one
    batch gives one smaller batch). Since the plan depends on nothing else, a resumed run that
    starts at ``start_step`` sees exactly the batches the interrupted run would have seen.
    """

    def __init__(self, num_samples, batch_size, seed, world_size=1, rank=0, accum_steps=1):
        if num_samples < 1:
            raise UserError("the training set is empty")
        self.num_samples, self.seed = num_samples, seed
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.batch_size = min(batch_size, num_samples)
        self.steps_per_epoch = max(1, num_samples // self.batch_size)
        parts = world_size * accum_steps
        if self.batch_size // parts < 2:
            # Name the batch the user asked for; when the data set cut it, say so (raising
            # --batch-size cannot help then).
            whole_set = batch_size >= num_samples  # a larger --batch-size is cut to this too
            if batch_size > num_samples:
                batch = (f"a batch of {self.batch_size} (--batch-size {batch_size}, cut to the "
                         f"{num_samples} training images)")
            else:
                batch = f"--batch-size {batch_size}"
            remedy = ("lower --accum-steps or add training images" if whole_set
                      else "raise --batch-size or lower --accum-steps")
            raise UserError(
                f"{batch} split over {world_size} process(es) x {accum_steps} accumulation "
                f"step(s) leaves fewer than 2 images per micro-batch (BatchNorm needs 2): "
                f"{remedy}")

    def permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def micro_batches(self, epoch, start_step=0):
        """Yield this rank's micro-batches from ``start_step`` on, as ``(index, epoch)`` keys."""
        order = self.permutation(epoch)
        parts = self.world_size * self.accum_steps
        for step in range(start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            chunks = np.array_split(batch, parts)
            for a in range(self.accum_steps):
                yield [(int(i), epoch) for i in chunks[a * self.world_size + self.rank]]


class ListBatchSampler:
    """A DataLoader ``batch_sampler`` over a fixed list of batches."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def size_grouped_batches(sizes, batch_size):
    """Batches of indices whose images share a size (``sizes[i]`` is a (w, h) or None to skip).

    Images of different sizes never share a batch; groups come in order of first appearance.
    """
    groups = OrderedDict()
    for i, size in enumerate(sizes):
        if size is not None:
            groups.setdefault(size, []).append(i)
    batches = []
    for members in groups.values():
        batches += [members[j:j + batch_size] for j in range(0, len(members), batch_size)]
    return batches


def shard(batches, world_size, rank):
    """Round-robin batches over ranks: no padding, so no sample is counted twice."""
    return batches[rank::world_size]
