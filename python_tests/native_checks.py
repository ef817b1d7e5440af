"""Building and running the stand-alone C++ check programs (cuda_host/, cpu_asan/): each prints
one line per check, "FAILED" on the bad ones, and "ALL OK" at the end. Shared by
test_cuda_kernels_on_host.py and test_cpu_kernels_asan.py."""
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _torch_include():
    # c10's BFloat16 and Half are header-only on the host: the checks run the half types.
    from torch.utils.cpp_extension import include_paths
    return include_paths()[0]


def _asan_env():
    # Leak checking needs ptrace, which some containers deny; leaks are not what this checks.
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0")


def sanitizer_flags(tmp_path):
    """-fsanitize=address where the compiler can build and run it: an out-of-bounds access
    (shared memory, a padded plane, any buffer) then fails the check even when the values come
    out right."""
    probe = tmp_path / "asan_probe"
    source = tmp_path / "asan_probe.cpp"
    source.write_text("int main() { return 0; }\n")
    build = subprocess.run([compiler(), "-fsanitize=address", str(source), "-o", str(probe)],
                           capture_output=True, timeout=120)
    if build.returncode != 0:
        return []
    ran = subprocess.run([str(probe)], capture_output=True, timeout=60, env=_asan_env())
    return ["-fsanitize=address", "-g"] if ran.returncode == 0 else []


def build_and_run(tmp_path, source, flags, ok_marker, expected_checks):
    """Compiles `source` (with csrc/, cuda_host/ and torch's headers on the include path) with
    `flags`, runs it, and asserts that it ends with "ALL OK" after exactly `expected_checks`
    lines containing `ok_marker` (so a check that silently stops running fails)."""
    binary = tmp_path / os.path.splitext(os.path.basename(source))[0]
    build = subprocess.run(
        [compiler(), "-std=c++20", *flags,
         "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(HERE, "cuda_host"),
         "-I", _torch_include(), source, "-o", str(binary)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=900,
                         env=_asan_env())
    failed = [line for line in run.stdout.splitlines() if "FAILED" in line]
    assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL OK"), (
        "\n".join(failed) or run.stdout[-2000:] + run.stderr[-3000:])
    assert run.stdout.count(ok_marker) == expected_checks
