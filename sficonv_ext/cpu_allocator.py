"""Two ways to keep large CPU tensors from being page-faulted in again on every training step:
a process-wide glibc setting (:func:`keep_large_blocks_on_heap`) and a cache of large blocks
that is on only inside a ``with`` block (:func:`large_block_cache`, from the compiled extension).
Apart from both, the extension's CPU kernels keep their own large blocks (the Winograd 3x3
convolutions' temporaries; the outputs from 31 MiB of the BatchNorm epilogue and the 3x3 and
1x1 convolutions) in a pool that is always on (:func:`kernel_pool_stats`, :func:`trim_kernel_pool`).

glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it on free, so each large
activation is faulted in 4 KB at a time on every step. SFIConv-ResNet's fused activations are
exactly such blocks (``[8, 256, 64, 64]`` float32 is 32 MiB plus glibc's header), where the
published network's half-width branches stay below the limit: on the 2-core test CPU the fast
model trained 24-32% faster with the glibc setting, the published one 4-22% faster (runs of
2026-11-26 and 2026-11-27; benchmarks/results/models_cpu_no_mmap.json against models_cpu.json).

The rest of this note is about the glibc setting.

The cost is memory: freed blocks stay in the process for reuse, so its resident size stays near
its peak (a freed block below a live one is never returned; ``M_TRIM_THRESHOLD`` = 1 GiB only
bounds what is returned from the top of the heap). A 2 GiB tensor freed under a small live one
left 2.5 GB resident against 0.5 GB with glibc's defaults. It is therefore not applied on
import: it changes how every large block of the whole process is served. The ``sficonv``
command applies it to its own CPU runs with ``--cpu-malloc reuse``; its default there is the
scoped cache (``--cpu-malloc cache``): as fast, with a lower training peak (one epoch of the
built-in data at 256 px, batch 8, on the 2-core test CPU: 105.3 s and 2.30 GB peak resident
with the glibc setting, 106.9 s and 1.78 GB with the cache, 122.5 s and 1.96 GB with glibc's
defaults; for eval see the README).
"""
import contextlib
import ctypes
import ctypes.util
import itertools
import os

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


# ---- The scoped cache (csrc/cpu_block_cache.cpp) ----

def _ops_namespace():
    import torch
    return torch.ops.sficonv_ext


_block_tokens = itertools.count(1)  # next() is atomic under the GIL


def _cache_ops(feature="large_block_cache"):
    from .ops import _extension
    if not _extension.has_cpp_kernels():
        raise RuntimeError(f"{feature} needs the compiled extension sficonv_ext._C: "
                           f"{_extension.LOAD_ERROR or _extension.REBUILD_HINT}")
    ops = _ops_namespace()
    if not hasattr(ops, "cpu_block_cache_enter"):
        # A sficonv_ext._C built from older sources (pulled, not rebuilt) still loads.
        raise RuntimeError(f"the compiled extension sficonv_ext._C predates the block cache's "
                           f"current form: {_extension.REBUILD_HINT}")
    return ops


@contextlib.contextmanager
def large_block_cache(min_bytes=1 << 20, budget=2.0):
    """While the ``with`` block runs, CPU tensor storage of at least ``min_bytes`` is kept when
    freed and handed out again for a request of the same size (to within 1/16), instead of
    being unmapped and page-faulted in again: what glibc does to blocks above 32 MiB, the size
    of SFIConv-ResNet's fused activations at batch 8, 256x256. On the 2-core test CPU the fast
    model's train step took 0.44 s inside against 0.69 s with glibc's defaults (as fast as
    :func:`keep_large_blocks_on_heap`).

    It replaces torch's default CPU allocator for the whole process (every thread) until the
    outermost block ends (``RuntimeError`` if another CPU allocator is installed). Leaving it
    frees every cached block and puts torch's allocator back; tensors made inside stay valid
    and free their memory when they go. Unlike :func:`keep_large_blocks_on_heap` nothing
    outlives the block, and it works with any C library. The cost, inside: the process keeps
    freed large blocks, at most as much as keeps (in use + cached) within ``budget`` times the
    largest amount ever in use at once (a new size that would go beyond that first frees the
    blocks cached longest ago; a large allocation that fails frees them all and retries;
    :func:`trim_large_block_cache` frees them all on request). oneDNN's own memory (allocated
    through the same allocator) is cached the same way. A process forked inside (a DataLoader
    worker) starts with the cache off and may enter a block of its own. Nested blocks keep the
    outermost one's ``min_bytes`` and ``budget``.

    ``budget`` (1 to 64, default 2): training reuses blocks of many sizes between steps, and a
    budget of 1 evicted and page-faulted 15,000-23,000 pages a step back in. Inference keeps
    few activations alive at once, so there a lower budget trades speed for memory: on 512 px
    images ``sficonv eval`` took 10.0-10.5 s and 2.63 GB at 2, 14.0-14.3 s and 1.71-1.76 GB at
    1, against 17.7-18.9 s and 1.72 GB with glibc's defaults (README, Performance, CPU)."""
    if (isinstance(min_bytes, bool) or not isinstance(min_bytes, int)
            or not 0 <= min_bytes < 1 << 63):
        raise ValueError(f"min_bytes must be a non-negative int below 2**63, got {min_bytes!r}")
    if (isinstance(budget, bool) or not isinstance(budget, (int, float))
            or not 1.0 <= budget <= 64.0):
        raise ValueError(f"budget must be a number from 1 to 64, got {budget!r}")
    ops = _cache_ops()
    entered_in = os.getpid()
    # This block's name on the C++ side, which keeps the set of open blocks: opening or closing
    # a name twice does nothing there. So a Ctrl-C anywhere cannot leave the cache on for good
    # (a review's SIGINTs did, 21 times in 3,000, when a plain count was closed here once): the
    # block is closed whether the interrupt came before or after the open reached C++ (real
    # SIGINTs were handled as it returned 2,821 times in 3,000), and a close it may have cut
    # short is retried, the interrupt raised after.
    token = next(_block_tokens)
    try:
        ops.cpu_block_cache_enter(token, min_bytes, float(budget))
        yield
    finally:
        interrupted = None
        while True:
            try:
                if os.getpid() == entered_in:  # a forked child starts with every block closed
                    ops.cpu_block_cache_exit(token)
                break
            except KeyboardInterrupt as interrupt:
                interrupted = interrupt
        if interrupted is not None:
            raise interrupted


def trim_large_block_cache():
    """Free every block the cache holds for reuse now (it stays on); returns the bytes freed,
    0 when it is off or the compiled extension lacks it. For a loop about to change the sizes
    it allocates (an evaluation moving to another image size), whose old blocks no new request
    would fit."""
    try:
        ops = _cache_ops()
    except RuntimeError:
        return 0
    return int(ops.cpu_block_cache_trim())


def large_block_cache_stats():
    """The cache's counters as a dict: ``on``, ``min_bytes``; since the outermost block was last
    entered, ``hits`` and ``misses`` (requests served from a freed block or not), ``evictions``
    (cached blocks freed to stay within the budget, by a trim, or after a failed allocation),
    ``live_bytes`` (blocks it handed out that are still in use) and ``peak_live_bytes``;
    ``cached_bytes`` (freed blocks held for reuse). On leaving the block ``cached_bytes`` and
    ``live_bytes`` go to 0 (blocks still in use are then torch's to free)."""
    values = list(_cache_ops().cpu_block_cache_stats())
    keys = ("on", "min_bytes", "hits", "misses", "evictions", "cached_bytes", "live_bytes",
            "peak_live_bytes")
    stats = dict(zip(keys, values))
    stats["on"] = bool(stats["on"])
    return stats


def large_blocks_reused(nbytes=32 << 20):
    """Whether a CPU block of ``nbytes`` freed now would be kept for reuse, process-wide: after
    :func:`keep_large_blocks_on_heap`, or inside a :func:`large_block_cache` block that caches
    blocks of that size. Other ways of keeping them (``MALLOC_MMAP_THRESHOLD_``, another
    malloc) are not seen. The 1x1 convolutions' "auto" rule asks it (sficonv_ext/ops/conv1x1.py):
    where large blocks are reused, oneDNN's convolution writes its outputs without page faults
    and stays the faster path."""
    if _applied:
        return True
    from .ops import _extension
    if not _extension.has_cpp_kernels():
        return False
    on, min_bytes = list(_ops_namespace().cpu_block_cache_stats())[:2]
    return bool(on) and min_bytes <= nbytes


def kernel_pool_stats():
    """The pool that keeps the extension's large CPU blocks for reuse across calls, so that
    glibc does not map and fault them in again on every call: the Winograd 3x3 convolutions'
    temporaries of 1 MiB or more (weight tiles, tile-domain inputs and products), and the
    outputs of 31 MiB or more of the BatchNorm epilogue, the Winograd convolutions and the 1x1
    convolutions' matrix product (glibc maps every block over 32 MiB afresh).
    Always on. Blocks waiting for reuse are capped at the larger of 256 MiB and twice the
    most it has had handed out at once since the last :func:`trim_kernel_pool` (so after a
    large workload it may hold up to twice that workload's peak until trimmed).

    A dict: ``cached_bytes`` (held for reuse), ``in_use_bytes``, ``peak_in_use_bytes``, and
    since the process started ``hits`` and ``misses`` (requests served from the pool or not)
    and ``evictions`` (blocks freed to make room, those that had waited longest first)."""
    # A binary without the pool's ops is refused at import (its extension API is older).
    values = list(_cache_ops("kernel_pool_stats").cpu_scratch_stats())
    keys = ("cached_bytes", "in_use_bytes", "hits", "misses", "evictions", "peak_in_use_bytes")
    return dict(zip(keys, values))


def trim_kernel_pool():
    """Free the blocks the kernel pool holds for reuse (e.g. after training, to get the memory
    back); returns the bytes freed, 0 without the compiled extension. Blocks still in use go
    back to the pool when their tensors die."""
    try:
        ops = _cache_ops("trim_kernel_pool")
    except RuntimeError:
        return 0
    return int(ops.cpu_scratch_trim())


# The names of the morning of 2026-11-28, when the pool held only the Winograd temporaries.
winograd_scratch_stats = kernel_pool_stats
trim_winograd_scratch = trim_kernel_pool
