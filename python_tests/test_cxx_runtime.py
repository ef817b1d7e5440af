"""The extension must use the C++ runtime that torch loaded (sficonv_ext/ops/cxx_runtime.py).

A library holding its own copy of libstdc++'s stream code mis-formats numbers in this process:
on the GPU machines of 2026-11-28 every error message with a number crashed; here a small
library linked with -static-libstdc++ silently drops the number. These tests build such a
library, check that the detector flags it, that linking the loaded runtime first (setup.py)
cures it, and that the built extension is clean and its numbered errors arrive whole."""
import ctypes
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from sficonv_ext import ops
from sficonv_ext.ops import cxx_runtime

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF/libstdc++ only")

SOURCE = r"""
#include <sstream>
#include <string>
extern "C" int format_number(long value, char* out, int size) {
  std::ostringstream stream;
  stream << "got " << value;
  const std::string text = stream.str();
  const int n = static_cast<int>(text.size()) < size - 1 ? static_cast<int>(text.size()) : size - 1;
  text.copy(out, n);
  out[n] = '\0';
  return n;
}
"""


def build_library(folder, name, extra):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = folder / "format_number.cpp"
    source.write_text(SOURCE)
    path = folder / f"{name}.so"
    done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(path), str(source),
                           *extra], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot build the probe library: {done.stderr.strip()[:200]}")
    return str(path)


def format_with(path, value):
    library = ctypes.CDLL(path)
    buffer = ctypes.create_string_buffer(64)
    library.format_number(value, buffer, 64)
    return buffer.value.decode()


@linux_only
def test_loaded_runtime_is_found():
    path = cxx_runtime.loaded_runtime_path()  # torch is imported, so libstdc++ is mapped
    assert path is not None and "libstdc++.so" in path


@linux_only
def test_detector_flags_a_static_copy_and_the_shared_link_cures_it(tmp_path):
    runtime = cxx_runtime.loaded_runtime_path()
    if runtime is None:
        pytest.skip("no libstdc++ loaded")
    plain = build_library(tmp_path, "plain", [])
    static = build_library(tmp_path, "static", ["-static-libstdc++"])
    # What setup.py does: the loaded runtime ahead of the compiler's -lstdc++ (here even of an
    # explicit static one).
    cured = build_library(tmp_path, "cured", ["-static-libstdc++", runtime])
    # Loaded first: the detector looks at libraries already in the process.
    assert format_with(plain, 1234567) == "got 1234567"
    assert cxx_runtime.runtime_status(plain)[0] != "private"
    print("the static copy formats:", repr(format_with(static, 1234567)))  # "got " here
    state, message = cxx_runtime.runtime_status(static)
    assert state == "private" and cxx_runtime.STREAM_INSERT_LONG in message
    assert format_with(cured, 1234567) == "got 1234567"
    assert cxx_runtime.runtime_status(cured)[0] != "private"


def test_status_is_unknown_not_an_error_when_it_cannot_tell(tmp_path):
    # Runs on every import: a library that is not loaded (or any failure) gives "unknown".
    state, detail = cxx_runtime.runtime_status(str(tmp_path / "not_loaded.so"))
    assert state == "unknown" and detail


@linux_only
@pytest.mark.skipif(not ops.backends()["cpp"], reason="C++ extension not built")
def test_extension_uses_the_shared_runtime_and_its_numbered_errors_arrive_whole():
    from sficonv_ext import _C
    state, holder = cxx_runtime.runtime_status(_C.__file__)
    assert state == "shared" and "libstdc++" in holder
    assert ops.backends()["cxx_runtime"] == "shared"
    # A message that formats numbers, raised by the extension's own C++ code.
    with pytest.raises(RuntimeError, match="weight has 3 channels but x has 2"):
        torch.ops.sficonv_ext.mcs_conv_forward(torch.randn(1, 2, 5, 5), torch.randn(3, 1, 3, 3),
                                               True, 1e-6)


@pytest.mark.skipif(not ops.backends()["cpp"], reason="C++ extension not built")
def test_error_probe_reports_a_raised_error():
    # scripts/cuda_error_probe.py, the GPU check's diagnosis of crashing errors, on one CPU case.
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "cuda_error_probe.py"
    done = subprocess.run([sys.executable, str(script), "--only", "CPU tensors (channel"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    want = "CPU tensors (channel mismatch): raised RuntimeError: mcs_conv: weight has 3"
    assert want in done.stdout
    assert "0 case(s) crashed or failed" in done.stdout


CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

# The extension's way to build a message (csrc/error_text.h) beside a stream's, in one library.
ERROR_TEXT_SOURCE = r"""
#include <sstream>
#include <string>
#include "error_text.h"
static int give(const std::string& text, char* out, int size) {
  const int n = static_cast<int>(text.size()) < size - 1 ? static_cast<int>(text.size()) : size - 1;
  text.copy(out, n);
  out[n] = '\0';
  return n;
}
extern "C" int stream_text(long value, char* out, int size) {
  std::ostringstream stream;
  stream << "got " << value;
  return give(stream.str(), out, size);
}
extern "C" int error_text(long value, double real, char* out, int size) {
  const int64_t sizes[] = {value, 3};
  return give(sficonv::error_text("got ", value, ", eps ", real, ", shape ",
                                  c10::IntArrayRef(sizes), ", dtype ", c10::ScalarType::Float,
                                  ", size_t ", size_t{7}, ", int ", 5, ", float ", 0.5f),
              out, size);
}
"""


@linux_only
def test_error_text_keeps_numbers_where_a_private_stream_copy_drops_them(tmp_path):
    # The library is linked as the GPU machines' build was in effect: with its own copy of
    # libstdc++ (-static-libstdc++). A stream there garbles the number; error_text does not.
    from torch.utils import cpp_extension
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "error_text_probe.cpp"
    source.write_text(ERROR_TEXT_SOURCE)
    path = tmp_path / "error_text_probe.so"
    includes = [f"-I{folder}" for folder in cpp_extension.include_paths()] + [f"-I{CSRC}"]
    done = subprocess.run([compiler, "-O1", "-std=c++20", "-shared", "-fPIC", "-o", str(path),
                           str(source), *includes, "-static-libstdc++"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    library = ctypes.CDLL(str(path))
    buffer = ctypes.create_string_buffer(256)
    library.stream_text(ctypes.c_long(1234567), buffer, 256)
    print("a stream in the static copy formats:", repr(buffer.value.decode()))
    library.error_text(ctypes.c_long(1234567), ctypes.c_double(1e-6), buffer, 256)
    assert buffer.value.decode() == ("got 1234567, eps 1e-06, shape [1234567, 3], dtype Float, "
                                     "size_t 7, int 5, float 0.5")


# What builds a message through a stream: c10's checks, asserts and warnings with a message,
# c10::str, and the streams themselves. TORCH_INTERNAL_ASSERT without a message builds none.
STREAM_MESSAGES = re.compile(
    r"\b(TORCH_CHECK\w*|AT_ERROR|AT_ASSERTM?|C10_THROW_ERROR|TORCH_WARN\w*)\b"
    r"|\bTORCH_INTERNAL_ASSERT\w*\s*\([^;]*,"
    r"|\bc10::str\b|\bstd::\w*stringstream\b|\bstd::ostream\b|\bstd::c(?:out|err)\b")


def code_of(text):
    """``text`` without its comments (// and /* */) and string literals."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def test_every_check_in_csrc_builds_its_message_without_streams():
    # A bare TORCH_CHECK (or c10::str, or a stream) in csrc/ would bring back messages that a
    # private libstdc++ copy garbles or crashes on: SFI_CHECK (error_text.h) is the rule.
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if (path.suffix not in {".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh", ".inl"}
                or path.name == "error_text.h"):
            continue
        code = code_of(path.read_text())
        for match in STREAM_MESSAGES.finditer(code):
            number = code.count("\n", 0, match.start()) + 1
            offenders.append(f"{path.relative_to(CSRC)}:{number}: {match.group(0)}")
    assert not offenders, "\n".join(offenders)


def test_the_stream_lint_sees_what_it_must():
    # The rule above must not pass by matching nothing.
    seen = STREAM_MESSAGES.findall(code_of(
        'TORCH_CHECK(a, "x", n);\nTORCH_INTERNAL_ASSERT(b, "y", n);\nauto s = c10::str(n);\n'
        'std::ostringstream o;\nTORCH_WARN("z");\n'))
    assert len(seen) == 5
    assert not STREAM_MESSAGES.search(code_of(
        '// TORCH_CHECK in a comment\n/* c10::str( */ SFI_CHECK(a, "TORCH_CHECK(", n);\n'
        'TORCH_INTERNAL_ASSERT(b);\n'))


@pytest.mark.skipif(not ops.backends()["cpp"], reason="C++ extension not built")
def test_the_extensions_messages_print_sizes_dtypes_and_reals_as_torch_does():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"got shape \[3, 2, 5\]"):
        torch.ops.sficonv_ext.mcs_conv_forward(x, torch.randn(3, 2, 5), True, 1e-6)
    with pytest.raises(RuntimeError, match="x is Float but weight is Double"):
        torch.ops.sficonv_ext.mcs_conv_forward(x, torch.randn(3, 1, 3, 3, dtype=torch.float64),
                                               True, 1e-6)
    with pytest.raises(RuntimeError, match=r"eps must be positive, got -0\.25$"):
        torch.ops.sficonv_ext.mcs_conv_forward(x, torch.randn(3, 1, 3, 3), True, -0.25)
