"""The CPU kernels compiled on their own with AddressSanitizer, every access checked against
buffers of exactly a tensor's size and every result against a float64 reference:
- the MCSConv kernels (python_tests/cpu_asan/cpu_kernels.cpp), with every vector load and store,
  in all four dtypes. The Python tests (test_mcs_op.py) check the values through the op; only
  this one sees a read past the end of a row or a padded plane that leaves the values right.
- the Winograd transforms (python_tests/cpu_asan/winograd_kernels.cpp, csrc/winograd_transforms.h)
  against a direct convolution: forward, bias + ReLU, both gradients, both weight layouts."""
import os

import pytest

from native_checks import HERE, build_and_run, compiler, sanitizer_flags

# 6 shapes x 4 filter sizes x 4 dtypes x (channels_last: correlate, weight grad; NCHW: the same,
# each also through its checked loop)
EXPECTED_CHECKS = 6 * 4 * 4 * (2 + 4)


def _build_and_run_with_asan(tmp_path, source, expected_checks):
    sanitizer = sanitizer_flags(tmp_path)
    if not sanitizer:
        pytest.skip("the compiler cannot build or run -fsanitize=address programs here")
    # -march as setup.py builds the extension (native unless SFICONV_CPU_ARCH says otherwise),
    # so that the same vector code paths are the ones checked.
    arch = os.environ.get("SFICONV_CPU_ARCH", "native")
    build_and_run(tmp_path, os.path.join(HERE, "cpu_asan", source),
                  ["-O2", *([f"-march={arch}"] if arch else []), *sanitizer], ": ok",
                  expected_checks)


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
def test_cpu_kernels_stay_in_bounds_and_match_references(tmp_path):
    _build_and_run_with_asan(tmp_path, "cpu_kernels.cpp", EXPECTED_CHECKS)


# 5 shapes x 2 dtypes x 2 weight layouts x (forward, bias+relu, weight grad, input grad)
WINOGRAD_CHECKS = 5 * 2 * 2 * 4


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
def test_winograd_transforms_stay_in_bounds_and_match_a_direct_convolution(tmp_path):
    _build_and_run_with_asan(tmp_path, "winograd_kernels.cpp", WINOGRAD_CHECKS)
