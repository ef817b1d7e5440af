"""The CUDA kernels of csrc/mcs_conv_cuda_rows.cuh (row-blocked) and csrc/mcs_conv_cuda_tiles.cuh
(shared-memory tile), compiled as host C++ and run on the CPU (python_tests/cuda_host/): CI has
no GPU, so this is where their indexing, halo, staging and block-reduction logic is checked
against float64 references on every change. The GPU tests check the same kernels on a device, in
every dtype, with the real launch code."""
import os
import warnings

import pytest

from native_checks import HERE, build_and_run, compiler, sanitizer_flags

# program -> how many checks it must report "ok" (so a check that silently stops running fails)
PROGRAMS = {
    "rows_kernels": 80,  # 6 shapes x 5 type/filter cases x 2-3 kernels
    # 7 shapes x 6 type/filter/tile-width cases x scalar (+ vector where w allows),
    # + 7 capped builds, + 32 pipelined (6 shapes x 6 cases where w is whole vectors)
    "tile_kernels": 107,
}


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_cuda_kernels_match_references_on_the_host(tmp_path, program):
    sanitizer = sanitizer_flags(tmp_path)
    if not sanitizer:
        # The values are still checked; out-of-bounds accesses that leave them right are not.
        warnings.warn(f"{program}: AddressSanitizer cannot build or run here; the host checks "
                      f"run without it")
    build_and_run(tmp_path, os.path.join(HERE, "cuda_host", program + ".cpp"),
                  ["-O1", "-pthread", *sanitizer], " ok", PROGRAMS[program])
