"""``sficonv_ext.cpu_allocator`` and ``--cpu-malloc``: the glibc setting takes effect (checked
through glibc's own counters, in a fresh process) and CPU training runs log it."""
import ctypes
import ctypes.util
import subprocess
import sys
import textwrap

import pytest
import torch

from sficonv_ext.train.cpu_memory import apply_cpu_malloc

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


def test_apply_cpu_malloc_speaks_only_for_cpu_runs_that_ask():
    assert apply_cpu_malloc("default", torch.device("cpu")) is None
    assert apply_cpu_malloc("reuse", torch.device("cuda")) is None
    note = apply_cpu_malloc("reuse", torch.device("cpu"))
    assert note is not None and "--cpu-malloc reuse" in note
