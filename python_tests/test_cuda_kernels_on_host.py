"""The CUDA kernels of csrc/mcs_conv_cuda_rows.cuh (row-blocked) and csrc/mcs_conv_cuda_tiles.cuh
(shared-memory tile), compiled as host C++ and run on the CPU (python_tests/cuda_host/): CI has
no GPU, so this is where their indexing, halo, staging and block-reduction logic is checked
against float64 references on every change. The GPU tests check the same kernels on a device, in
every dtype, with the real launch code."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# program -> how many checks it must report "ok" (so a check that silently stops running fails)
PROGRAMS = {
    "rows_kernels": 80,  # 6 shapes x 5 type/filter cases x 2-3 kernels
    # 7 shapes x 6 type/filter/tile-width cases x scalar (+ vector where w allows),
    # + 7 capped builds
    "tile_kernels": 75,
}


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _torch_include():
    # c10's BFloat16 and Half are header-only on the host: the checks run the half types.
    from torch.utils.cpp_extension import include_paths
    return include_paths()[0]


def _sanitizer_flags(tmp_path):
    """-fsanitize=address where the compiler can build and run it: an out-of-bounds access to
    shared memory (or any other buffer) then fails the test even when the values come out
    right."""
    probe = tmp_path / "asan_probe"
    source = tmp_path / "asan_probe.cpp"
    source.write_text("int main() { return 0; }\n")
    build = subprocess.run([_compiler(), "-fsanitize=address", str(source), "-o", str(probe)],
                           capture_output=True, timeout=120)
    if build.returncode != 0:
        return []
    ran = subprocess.run([str(probe)], capture_output=True, timeout=60, env=_asan_env())
    return ["-fsanitize=address", "-g"] if ran.returncode == 0 else []


def _asan_env():
    # Leak checking needs ptrace, which some containers deny; leaks are not what this checks.
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0")


@pytest.mark.skipif(_compiler() is None, reason="no C++ compiler")
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_cuda_kernels_match_references_on_the_host(tmp_path, program):
    binary = tmp_path / program
    build = subprocess.run(
        [_compiler(), "-std=c++20", "-O1", "-pthread", *_sanitizer_flags(tmp_path),
         "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(HERE, "cuda_host"),
         "-I", _torch_include(),
         os.path.join(HERE, "cuda_host", program + ".cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900,
                         env=_asan_env())
    failed = [line for line in run.stdout.splitlines() if "FAILED" in line]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), (
        "\n".join(failed) or run.stdout[-2000:] + run.stderr[-2000:])
    assert run.stdout.count(" ok") == PROGRAMS[program]
