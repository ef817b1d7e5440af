"""``--cpu-malloc``: how a CPU run keeps its large tensors from being page-faulted in again on
every step (see :mod:`sficonv_ext.cpu_allocator`)."""
import contextlib

from ..cpu_allocator import keep_large_blocks_on_heap, large_block_cache

CPU_MALLOC_CHOICES = ("reuse", "cache", "default")


def _reuse_note(prefix=""):
    if keep_large_blocks_on_heap():
        return prefix + "CPU memory: large tensors kept on the heap for reuse (--cpu-malloc reuse)"
    return prefix + "CPU memory: --cpu-malloc reuse needs glibc; left at the C library's defaults"


@contextlib.contextmanager
def cpu_malloc(choice, device):
    """Apply ``--cpu-malloc`` to the run inside the block; yields a line for the log, or None
    when there is nothing to say (a GPU run, or glibc's defaults asked for).

    ``reuse``: glibc's heap setting, for the rest of the process. ``cache``: the scoped block
    cache of the compiled extension, on until the block ends; where it cannot be turned on (no
    compiled extension, another CPU allocator installed) the run falls back to ``reuse`` and the
    line says why."""
    if choice not in CPU_MALLOC_CHOICES:
        raise ValueError(f"--cpu-malloc must be one of {CPU_MALLOC_CHOICES}, got {choice!r}")
    if device.type != "cpu" or choice == "default":
        yield None
        return
    if choice == "reuse":
        yield _reuse_note()
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(large_block_cache())
            note = "CPU memory: freed large tensors cached for reuse (--cpu-malloc cache)"
        except RuntimeError as error:
            note = _reuse_note(f"--cpu-malloc cache unavailable ({error}); ")
        yield note
