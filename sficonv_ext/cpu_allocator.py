"""Process-wide glibc setting that keeps large CPU tensors from being page-faulted in again on
every training step.

glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it on free, so each large
activation is faulted in 4 KB at a time on every step. SFIConv-ResNet's fused activations are
exactly such blocks (``[8, 256, 64, 64]`` float32 is 32 MiB plus glibc's header), where the
published network's half-width branches stay below the limit: on the 2-core test CPU the fast
model trained 24% faster with this setting and the published one no faster
(benchmarks/results/models_cpu_no_mmap.json against models_cpu.json).

The cost is memory: freed blocks stay in the process for reuse, so its resident size stays near
its peak (a freed block below a live one is never returned; ``M_TRIM_THRESHOLD`` = 1 GiB only
bounds what is returned from the top of the heap). A 2 GiB tensor freed under a small live one
left 2.5 GB resident against 0.5 GB with glibc's defaults. It is therefore not applied on
import: it changes how every large block of the whole process is served. The ``sficonv``
command applies it to its own CPU runs (``--cpu-malloc reuse``, the default there), whose peak
is reached again on every step anyway.
"""
import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_large_blocks_on_heap():
    """Serve large blocks from the heap and keep freed memory for reuse (glibc's
    ``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD = 1 GiB``), for the whole process: its resident
    size then stays near its peak. Returns True when the setting is in force, False where the C
    library is not glibc."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)):
        return False
    _applied = True
    return True
