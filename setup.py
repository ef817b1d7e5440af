"""Build script: the Python package, plus the C++/CUDA extension ``sficonv_ext._C`` once
``csrc/`` holds kernel sources.

Install with ``pip install -e . --no-build-isolation`` (the extension builds against the torch
already installed). Environment:
  SFICONV_SKIP_CUDA=1    build the CPU extension only
  FORCE_CUDA=1           fail unless the CUDA kernels can be built (by default they are built
                         when torch is a CUDA build and nvcc is found, GPU or not)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0+PTX", also when set empty)
  MAX_JOBS               parallel compile jobs (read by torch's ninja build)
  SFICONV_CPU_ARCH       -march for the CPU kernels (default "native"; "" for the baseline)
"""
import glob
import json
import os
import shutil
import site
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _wheel_cuda_includes():
    # ATen's CUDA headers include cusparse.h etc.; a system toolkit may lack them, the nvidia-*
    # wheels that torch pulls in ship them under nvidia/cu13/include.
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for include in glob.glob(os.path.join(root, "nvidia", "cu1*", "include")):
            if os.path.isdir(include) and include not in found:
                found.append(include)
    return found


def _write_build_config(archs):
    # A generated header (not in git) carries the CUDA architectures into the binary, so that
    # `python -m sficonv_ext.info` reports what was really compiled.
    # Rewritten only when it changes: a new mtime would make ninja recompile ops.cpp each time.
    folder = os.path.join(HERE, "csrc", "generated")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "build_config.h")
    text = ("// Written by setup.py at build time.\n#pragma once\n"
            f"#define SFICONV_CUDA_ARCHS {json.dumps(archs)}\n")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _has_cudart(root):
    return bool(glob.glob(os.path.join(root, "lib64", "libcudart.so*")) or
                glob.glob(os.path.join(root, "lib", "libcudart.so*")))


def _locate_cuda_home():
    # torch guesses the toolkit from `which nvcc`; where nvcc is a wrapper script outside the
    # toolkit (as on this project's machines) that guess lacks libcudart. Point CUDA_HOME at a
    # real toolkit before torch.utils.cpp_extension reads it.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            os.environ["CUDA_HOME"] = root
            return


def _shared_cxx_runtime():
    """The libstdc++ that torch loaded, as a link input ahead of the compiler's own -lstdc++.
    On the GPU machines (torch 2.11, 2026-11-28) the extension came out with a private copy of
    libstdc++'s stream code, and every error message that formats a number crashed the process
    in it (sficonv_ext/ops/cxx_runtime.py says more). Linked first, the shared runtime resolves
    those symbols, so no archive member is pulled in for them (a toolchain's own archive, e.g.
    gcc-toolset's libstdc++_nonshared.a, still supplies what the loaded runtime lacks); where
    the compiler links the shared runtime anyway (the usual case) nothing changes. A loaded
    runtime older than the compiler's leaves the newer symbols undefined, and the import then
    names them. [] where it is not found (not Linux)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_sficonv_cxx_runtime", os.path.join(HERE, "sficonv_ext", "ops", "cxx_runtime.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # by path: importing the package would load a stale _C
    path = module.loaded_runtime_path()
    if path:
        print(f"sficonv_ext: linking the C++ runtime torch loaded: {path}", file=sys.stderr)
    return [path] if path else []


def _compiler_takes_openmp():
    """Whether the C++ compiler builds and links a program with -fopenmp (a machine may lack
    libgomp's development files even where torch ships its own runtime)."""
    import shlex
    import subprocess
    import tempfile
    compiler = shlex.split(os.environ.get("CXX", "c++"))  # may be a wrapper: "ccache g++"
    source = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(source)
        try:
            done = subprocess.run(compiler + ["-fopenmp", path, "-o", os.path.join(tmp, "probe")],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
    return done.returncode == 0


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp:
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    if "pip-build-env" in torch.__file__:
        print("sficonv_ext: building against the torch of an isolated build environment "
              f"({torch.__version__}), not the one installed: the extension may not import. "
              "Install with `pip install -e . --no-build-isolation`.", file=sys.stderr)
    # CUDA kernels need nvcc: a visible GPU with a runtime-only toolkit gets the CPU build.
    nvcc_found = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    skip = os.environ.get("SFICONV_SKIP_CUDA", "0") == "1"
    with_cuda = not skip and bool(cuda) and torch.version.cuda is not None and nvcc_found
    why_not = ("SFICONV_SKIP_CUDA=1 is set" if skip else
               "torch is not a CUDA build" if torch.version.cuda is None else
               "nvcc was not found (set CUDA_HOME to a CUDA toolkit)")
    if os.environ.get("FORCE_CUDA", "0") == "1" and not with_cuda:
        raise SystemExit(f"sficonv_ext: FORCE_CUDA=1, but the CUDA kernels cannot be built: "
                         f"{why_not}")
    print("sficonv_ext: building the C++ and CUDA kernels" if with_cuda else
          f"sficonv_ext: building the C++ kernels only ({why_not})", file=sys.stderr)
    # The C++ standard is left to torch (it needs C++20 from 2.10 on). The CPU kernels' inner
    # loops are written for the compiler to vectorise; -march=native lets it use the widest
    # vectors of the machine that builds them (set SFICONV_CPU_ARCH to target another, e.g.
    # "x86-64-v3", or to "" for the compiler's baseline when building for other machines).
    cxx = ["-O3"]
    cpu_arch = os.environ.get("SFICONV_CPU_ARCH", "native")
    if cpu_arch:
        cxx.append(f"-march={cpu_arch}")
    # at::parallel_for is an inline `#pragma omp parallel` in an OpenMP build of torch: without
    # -fopenmp the pragma is ignored and every CPU kernel runs on one thread. The extension
    # then uses the libgomp that torch already loaded (same soname), not a second runtime.
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        if _compiler_takes_openmp():
            cxx.append("-fopenmp")
            link.append("-fopenmp")
        else:
            print("sficonv_ext: the C++ compiler does not build with -fopenmp; the CPU kernels "
                  "will run on one thread", file=sys.stderr)
    link += _shared_cxx_runtime()
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            # Empty would make torch detect the visible GPUs (and crash without one).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        _write_build_config(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " "))
        include_dirs += _wheel_cuda_includes()
        ext = CUDAExtension(
            "sficonv_ext._C", cpp + cuda, include_dirs=include_dirs,
            define_macros=[("SFICONV_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link)
    else:
        ext = CppExtension("sficonv_ext._C", cpp, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": _incremental(BuildExtension.with_options(use_ninja=True))}


def _incremental(build_ext_class):
    """``build_ext`` whose objects stay under build/: pip's editable install builds in a fresh
    temporary folder each time, so ninja recompiled every source (1-2 minutes) on every
    `pip install -e .` and make target. Kept, ninja rebuilds only what changed (a new torch
    changes every command line, so everything then)."""

    class IncrementalBuildExtension(build_ext_class):
        def finalize_options(self):
            super().finalize_options()
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(HERE, "build", f"temp.{tag}")

    return IncrementalBuildExtension


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sficonv_ext", "sficonv_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
