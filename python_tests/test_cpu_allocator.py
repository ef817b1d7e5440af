"""``sficonv_ext.cpu_allocator`` and ``--cpu-malloc``: the glibc setting takes effect (checked
through glibc's own counters, in a fresh process); ``--cpu-malloc`` applies the chosen setting
only to CPU runs, the block cache only while the run lasts, and says what it did."""
import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest
import torch

from sficonv_ext.ops import _extension
from sficonv_ext.train import cpu_memory
from sficonv_ext.train.cpu_memory import cpu_malloc

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _GLIBC = hasattr(_LIBC, "mallinfo2")
except OSError:
    _GLIBC = False
glibc = pytest.mark.skipif(not _GLIBC, reason="needs glibc (mallinfo2)")

# Prints how many bytes glibc holds in mmapped blocks while a 64 MB tensor is alive.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    import torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "reuse":
        from sficonv_ext.cpu_allocator import keep_large_blocks_on_heap
        assert keep_large_blocks_on_heap()
    before = libc.mallinfo2().hblkhd
    t = torch.empty(16 * 2**20)  # 64 MiB of float32
    t.fill_(1.0)
    print(libc.mallinfo2().hblkhd - before)
""")


def _mapped_bytes(mode):
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip().splitlines()[-1])


@glibc
def test_large_blocks_stay_on_the_heap_only_when_asked():
    assert _mapped_bytes("default") >= 64 * 2**20  # glibc's default: a fresh mapping
    assert _mapped_bytes("reuse") == 0


def _note(choice, device):
    with cpu_malloc(choice, torch.device(device)) as note:
        return note


def test_cpu_malloc_speaks_only_for_cpu_runs_that_ask():
    assert _note("default", "cpu") is None
    assert _note("reuse", "cuda") is None
    assert _note("cache", "cuda") is None
    note = _note("reuse", "cpu")
    assert note is not None and "--cpu-malloc reuse" in note
    with pytest.raises(ValueError, match="--cpu-malloc must be one of"):
        _note("mmap", "cpu")


needs_extension = pytest.mark.skipif(not _extension.has_cpp_kernels(),
                                     reason="the block cache is in the compiled extension")


@needs_extension
def test_cpu_malloc_cache_is_on_only_inside_the_run():
    from sficonv_ext.cpu_allocator import large_block_cache_stats
    assert not large_block_cache_stats()["on"]
    with cpu_malloc("cache", torch.device("cpu")) as note:
        assert "--cpu-malloc cache" in note
        assert large_block_cache_stats()["on"]
        kept = torch.ones(2**20)  # 4 MiB: served by the cache, outlives the run
    assert not large_block_cache_stats()["on"]
    assert float(kept.sum()) == 2**20
    # A run that fails still turns it off, and the error reaches the caller unchanged.
    with pytest.raises(KeyError, match="boom"):
        with cpu_malloc("cache", torch.device("cpu")):
            raise KeyError("boom")
    assert not large_block_cache_stats()["on"]


def test_cpu_malloc_cache_falls_back_to_reuse_and_says_why(monkeypatch):
    def refuse():
        raise RuntimeError("another CPU allocator is installed")
    monkeypatch.setattr(cpu_memory, "large_block_cache", refuse)
    note = _note("cache", "cpu")
    assert "--cpu-malloc cache unavailable (another CPU allocator is installed)" in note
    assert "reuse" in note
