"""The MCSConv CPU kernels compiled on their own with AddressSanitizer
(python_tests/cpu_asan/cpu_kernels.cpp): every vector load and store checked against buffers of
exactly a tensor's size, and every result against a float64 reference, in all four dtypes. The
Python tests (test_mcs_op.py) check the values through the op; only this one sees a read past
the end of a row or a padded plane that leaves the values right."""
import os
import subprocess

import pytest

from test_cuda_kernels_on_host import _asan_env, _compiler, _sanitizer_flags, _torch_include

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# 6 shapes x 4 filter sizes x 4 dtypes x (channels_last: correlate, weight grad; NCHW: the same,
# each also through its checked loop)
EXPECTED_CHECKS = 6 * 4 * 4 * (2 + 4)


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler")
def test_cpu_kernels_stay_in_bounds_and_match_references(tmp_path):
    sanitizer = _sanitizer_flags(tmp_path)
    if not sanitizer:
        pytest.skip("the compiler cannot build or run -fsanitize=address programs here")
    binary = tmp_path / "cpu_kernels"
    # -march as setup.py builds the extension (native unless SFICONV_CPU_ARCH says otherwise),
    # so that the same vector code paths are the ones checked.
    arch = os.environ.get("SFICONV_CPU_ARCH", "native")
    build = subprocess.run(
        [_compiler(), "-std=c++20", "-O2", *([f"-march={arch}"] if arch else []), *sanitizer,
         "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(HERE, "cuda_host"),
         "-I", _torch_include(),
         os.path.join(HERE, "cpu_asan", "cpu_kernels.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900,
                         env=_asan_env())
    failed = [line for line in run.stdout.splitlines() if "FAILED" in line]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), (
        "\n".join(failed) or run.stdout[-2000:] + run.stderr[-3000:])
    assert run.stdout.count(": ok") == EXPECTED_CHECKS
