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
through the extension's handle (the extension first, then its dependencies), and asks
``dladdr`` which file holds the address found: the extension itself means it carries an
exported copy, which its own calls, bound at link time, reach. A heuristic with a blind spot:
a copy linked in but not exported (``--exclude-libs``, a version script) is not seen.
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
    # Two mapped copies would be unusual (a conda runtime and the system's); the one with the
    # longest name is the most specific version (libstdc++.so.6.0.33 over libstdc++.so.6).
    return max(found, key=len) if found else None


def _address(library, symbol):
    try:
        return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
    except AttributeError:
        return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _file_holding(address):
    """The path of the loaded object that holds ``address`` (dladdr), or None."""
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    if not libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def runtime_status(extension_path):
    """("shared" | "private" | "unknown", detail) for the library at ``extension_path``
    (already loaded): "private" when it holds its own exported copy of libstdc++'s stream code
    (detail: the warning text), "unknown" when this cannot be told (detail: why). Never
    raises: it runs on every import."""
    try:
        if not sys.platform.startswith("linux"):
            return "unknown", "checked on Linux only"
        mode = os.RTLD_LAZY | os.RTLD_NOLOAD  # both already loaded: nothing new is opened
        extension = ctypes.CDLL(extension_path, mode=mode)
        found = _address(extension, STREAM_INSERT_LONG)
        if found is None:
            return "unknown", f"{STREAM_INSERT_LONG} not found (not libstdc++?)"
        holder = _file_holding(found)
        if holder is None:
            return "unknown", "dladdr could not place the symbol"
        if holder != os.path.realpath(extension_path):
            return "shared", holder
        return "private", (
            f"{os.path.basename(extension_path)} carries its own copy of libstdc++'s stream "
            f"code ({STREAM_INSERT_LONG} is defined in it): an error message with a number in "
            "it may crash the process instead of raising. Rebuild with `pip install -e . "
            "--no-build-isolation` (setup.py links the loaded libstdc++ first); if it persists, "
            "the C++ compiler links libstdc++ statically")
    except Exception as error:  # noqa: BLE001 (a diagnostic must not break the import)
        return "unknown", f"check failed: {error}"

