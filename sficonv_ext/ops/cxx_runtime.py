"""Whether the compiled extension uses the C++ runtime (libstdc++) that torch loaded, or a
private copy of part of it.

Why it matters: on the GPU machine of 2026-11-28 (an H200; glibc 2.39, torch 2.11) the
extension came out holding its own copy of libstdc++'s stream code (the H100 and H200 runs of
2026-11-27 showed the same crashes). Every error message that formats a number
(``TORCH_CHECK(..., "got ", n)``) crashed the process inside that copy, while text-only
messages worked (``scripts/cuda_error_probe.py`` showed it, with the native stack). Most likely
the copy formats numbers through locale facets that the shared runtime, which set up the
stream, never registered with it; here a test library linked with -static-libstdc++ drops the
number instead (python_tests/test_cxx_runtime.py). The same failure is known from other
libraries that link libstdc++ statically (pytorch/pytorch#109923).

The check asks the dynamic linker for one such function, ``std::ostream::_M_insert<long>``,
through the extension's handle (the extension first, then its dependencies) and through
libstdc++'s: a different address means the extension calls its own copy.
"""
import ctypes
import os
import sys

# std::ostream& std::ostream::_M_insert<long>(long): what `stream << int64_t` runs, and where
# the crashes happened.
STREAM_INSERT_LONG = "_ZNSo9_M_insertIlEERSoT_"


def loaded_runtime_path():
    """The path of the libstdc++ this process has mapped (torch loads it), or None. setup.py
    links it ahead of the compiler's own -lstdc++ (it loads this file by path, without
    importing the package)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.isfile(p))
    return found[0] if found else None


def _address(library, symbol):
    try:
        return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


def private_runtime_copy(extension_path):
    """A message if the library at ``extension_path`` (already loaded) calls its own copy of
    libstdc++'s stream code instead of the loaded libstdc++'s; None when it uses the shared
    runtime or when this cannot be told (not Linux, no libstdc++, symbol not found)."""
    if not sys.platform.startswith("linux"):
        return None
    mode = os.RTLD_LAZY | os.RTLD_NOLOAD  # both already loaded: nothing new is opened
    try:
        extension = ctypes.CDLL(extension_path, mode=mode)
        runtime = ctypes.CDLL("libstdc++.so.6", mode=mode)
    except OSError:
        return None
    ours, shared = _address(extension, STREAM_INSERT_LONG), _address(runtime, STREAM_INSERT_LONG)
    if ours is None or shared is None or ours == shared:
        return None
    return ("sficonv_ext._C carries its own copy of libstdc++'s stream code "
            f"({STREAM_INSERT_LONG} at {ours:#x}, the loaded libstdc++'s at {shared:#x}): "
            "an error message with a number in it may crash the process instead of raising. "
            "Rebuild with `pip install -e . --no-build-isolation` (setup.py links the loaded "
            "libstdc++ first); if it persists, the C++ compiler links libstdc++ statically")
