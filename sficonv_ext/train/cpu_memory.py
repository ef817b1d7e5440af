"""``--cpu-malloc``: the glibc setting of :mod:`sficonv_ext.cpu_allocator` for CPU runs."""
from ..cpu_allocator import keep_large_blocks_on_heap


def apply_cpu_malloc(choice, device):
    """Apply ``--cpu-malloc`` for a run on ``device``; returns a line for the log, or None when
    there is nothing to say (a GPU run, or glibc's defaults asked for)."""
    if device.type != "cpu" or choice != "reuse":
        return None
    if keep_large_blocks_on_heap():
        return "CPU memory: large tensors kept on the heap for reuse (--cpu-malloc reuse)"
    return "CPU memory: --cpu-malloc reuse needs glibc; left at the C library's defaults"
