"""Build script: the Python package, plus the C++/CUDA extension ``sficonv_ext._C`` once
``csrc/`` holds kernel sources.

Install with ``pip install -e . --no-build-isolation`` (the extension builds against the torch
already installed). Environment:
  SFICONV_SKIP_CUDA=1    build the CPU extension only
  FORCE_CUDA=1           build CUDA kernels even if no GPU is visible (nvcc is still required)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0;9.0+PTX")
  MAX_JOBS               parallel compile jobs (read by torch's ninja build)
"""
import glob
import os
import site
import sys

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


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp:
        return [], {}
    import torch
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    with_cuda = (os.environ.get("SFICONV_SKIP_CUDA", "0") != "1" and bool(cuda)
                 and CUDA_HOME is not None and torch.version.cuda is not None
                 and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
                      or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))))
    cxx = ["-O3", "-std=c++17"]
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        include_dirs += _wheel_cuda_includes()
        ext = CUDAExtension(
            "sficonv_ext._C", cpp + cuda, include_dirs=include_dirs,
            define_macros=[("SFICONV_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]})
    else:
        ext = CppExtension("sficonv_ext._C", cpp, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["sficonv_ext", "sficonv_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
