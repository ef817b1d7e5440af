"""The MCSConv CPU kernels compiled on their own with AddressSanitizer
(python_tests/cpu_asan/cpu_kernels.cpp): every vector load and store checked against buffers of
exactly a tensor's size, and every result against a float64 reference, in all four dtypes. The
Python tests (test_mcs_op.py) check the values through the op; only this one sees a read past
the end of a row or a padded plane that leaves the values right."""
import os

import pytest

from native_checks import HERE, build_and_run, compiler, sanitizer_flags

# 6 shapes x 4 filter sizes x 4 dtypes x (channels_last: correlate, weight grad; NCHW: the same,
# each also through its checked loop)
EXPECTED_CHECKS = 6 * 4 * 4 * (2 + 4)


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
def test_cpu_kernels_stay_in_bounds_and_match_references(tmp_path):
    sanitizer = sanitizer_flags(tmp_path)
    if not sanitizer:
        pytest.skip("the compiler cannot build or run -fsanitize=address programs here")
    # -march as setup.py builds the extension (native unless SFICONV_CPU_ARCH says otherwise),
    # so that the same vector code paths are the ones checked.
    arch = os.environ.get("SFICONV_CPU_ARCH", "native")
    build_and_run(tmp_path, os.path.join(HERE, "cpu_asan", "cpu_kernels.cpp"),
                  ["-O2", *([f"-march={arch}"] if arch else []), *sanitizer], ": ok",
                  EXPECTED_CHECKS)
