"""One process, or many under ``torchrun``: NCCL on GPUs, gloo on CPUs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(name, local_rank=0, world_size=1):
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        try:
            index = None if name == "cuda" else torch.device(name).index
        except RuntimeError:
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
        if index is None and name != "cuda":  # torch.device("cuda:") and the like
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
        if index is not None and world_size > 1:
            # Every process would take that one GPU: under torchrun each takes its local rank's.
            raise UserError(f"--device {name} names one GPU, but {world_size} processes run: "
                            f"give --device cuda (each process takes its LOCAL_RANK's GPU)")
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available")
        if index is not None and index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
        return torch.device("cuda", local_rank if index is None else index)
    if name != "cpu":
        raise UserError(f"--device must be cpu or cuda, got {name!r}")
    return torch.device("cpu")


def setup(device_name):
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); return the context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, device)


def teardown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


def all_sum(ctx, values):
    """Sum a list of floats over ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if ctx.distributed:
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_lists(ctx, items):
    """Concatenate every rank's list (on every rank)."""
    if not ctx.distributed:
        return list(items)
    out = [None] * ctx.world_size
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_object(ctx, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(ctx, model):
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank updates its running statistics from its own micro-batches, so without this the
    ranks would validate with slightly different models, none of them the one rank 0 saves.
    """
    if not ctx.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
