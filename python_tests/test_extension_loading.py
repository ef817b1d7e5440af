"""How the package behaves with a broken or missing compiled extension, and what info reports."""
import os
import shutil
import subprocess
import sys
import sysconfig

import sficonv_ext

PACKAGE = os.path.dirname(sficonv_ext.__file__)

PROBE = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from sficonv_ext import ops
print("WARN:", " | ".join(str(w.message) for w in caught))
x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 1, 3, 3)
print("AUTO:", ops.resolve_backend("auto", x), tuple(ops.mcs_conv(x, w).shape))
try:
    ops.mcs_conv(x, w, backend="cpp")
except RuntimeError as error:
    print("CPP:", error)
"""


def _run_with_package_copy(tmp_path, extension_bytes, prelude="", expected_api=None):
    copy = tmp_path / "sficonv_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    if expected_api is not None:  # Python sources newer than the binary
        loader = copy / "ops" / "_extension.py"
        text = loader.read_text()
        assert 'EXTENSION_API = "' in text
        loader.write_text(text.replace('EXTENSION_API = "', f'EXTENSION_API = "{expected_api}'
                                       '" or "', 1))
    if extension_bytes is not None:
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        (copy / f"_C{suffix}").write_bytes(extension_bytes)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", prelude + PROBE], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_broken_extension_warns_with_rebuild_command_and_falls_back(tmp_path):
    out = _run_with_package_copy(tmp_path, b"not a shared library")
    assert "failed to import" in out and "pip install -e . --no-build-isolation" in out
    assert "AUTO: torch (1, 2, 6, 6)" in out
    assert "CPP:" in out and "rebuild" in out


def test_extension_built_from_older_sources_is_reported_not_half_used(tmp_path):
    # After a pull that changes the ops, the old binary still imports; registering against its
    # missing ops made `import sficonv_ext` fail. It must count as not loaded, with the hint.
    import glob

    import pytest
    built = glob.glob(os.path.join(PACKAGE, "_C*.so"))
    if not built:
        pytest.skip("the C++ extension is not built")
    with open(built[0], "rb") as f:
        binary = f.read()
    out = _run_with_package_copy(tmp_path, binary, expected_api="999")
    assert "out of date" in out and "these sources expect 999" in out
    assert "pip install -e . --no-build-isolation" in out
    assert "AUTO: torch (1, 2, 6, 6)" in out
    assert "CPP:" in out and "out of date" in out


def test_stale_reason_reads_the_interface_version():
    from sficonv_ext.ops import _extension
    current = f"api={_extension.EXTENSION_API};cpu=1;openmp=1;cuda=0"
    assert _extension.stale_reason(current) is None
    assert "unversioned" in _extension.stale_reason("cpu=1;openmp=1;cuda=0")
    assert "predates" in _extension.stale_reason(None)


def test_missing_extension_is_quiet_and_uses_pytorch(tmp_path):
    # An editable install can still map sficonv_ext._C to the checkout; block it explicitly.
    out = _run_with_package_copy(tmp_path, None,
                                 prelude="import sys; sys.modules['sficonv_ext._C'] = None\n")
    assert out.startswith("WARN: \n")
    assert "AUTO: torch (1, 2, 6, 6)" in out
    assert "CPP:" in out and "was not built" in out


def test_info_command_prints_backends():
    result = subprocess.run([sys.executable, "-m", "sficonv_ext.info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key in ("cpp", "cuda", "cuda_archs", "triton", "auto_cpu"):
        assert key in result.stdout


def test_cpu_kernels_are_built_with_openmp():
    # at::parallel_for is an inline OpenMP pragma: a build without -fopenmp silently runs every
    # C++ CPU kernel on one thread (as this project's kernels did until it was noticed).
    import pytest
    import torch

    from sficonv_ext.ops import _extension, backends
    if not _extension.has_cpp_kernels():
        pytest.skip("the C++ extension is not built")
    if not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")):
        pytest.skip("torch without OpenMP, or not Linux: setup.py builds without -fopenmp")
    assert backends()["cpp_openmp"], ("sficonv_ext._C was built without OpenMP: rebuild with a "
                                      "compiler that takes -fopenmp")
