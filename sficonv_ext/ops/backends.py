"""``backends()``: what this installation can run, as a dict."""
import torch

from . import _extension
from .mcs_conv import resolve_backend, triton_error, triton_ops


def backends():
    """Which kernels are available: C++ CPU, CUDA (and its archs), Triton, and what "auto"
    picks on each device. ``python -m sficonv_ext.info`` prints the same."""
    info = _extension.build_info()
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda_device = torch.cuda.is_available()
    result = {
        "torch": torch.__version__,
        "cpp": _extension.has_cpp_kernels(),
        # Built without OpenMP, the C++ kernels' at::parallel_for runs on one thread.
        "cpp_openmp": info.get("openmp") == "1",
        "cpu_threads": torch.get_num_threads(),
        "cuda": _extension.has_cuda_kernels(),
        "cuda_archs": info.get("cuda_archs", "") if _extension.has_cuda_kernels() else "",
        "extension_error": _extension.LOAD_ERROR,
        # "shared", "unknown (why)", or why a number in an error message may crash
        # (cxx_runtime.py).
        "cxx_runtime": _runtime_text(*_extension.RUNTIME_STATUS),
        "triton": triton_version,
        "triton_ops": triton_ops() is not None,
        "triton_error": triton_error(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda_device else None,
        "auto_cpu": resolve_backend("auto", torch.empty(1, 2, 1, 1)),
        "auto_cpu_channels_last_frozen": resolve_backend(
            "auto", torch.empty(1, 2, 2, 2).contiguous(memory_format=torch.channels_last)),
        "auto_cpu_channels_last_frozen_bfloat16": resolve_backend(
            "auto", torch.empty(1, 2, 2, 2, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last)),
        # The same input when it needs a gradient (training): a different choice on the CPU.
        "auto_cpu_channels_last_frozen_bfloat16_grad": resolve_backend(
            "auto", torch.empty(1, 2, 2, 2, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last).requires_grad_()),
    }
    if _extension.has_cuda_kernels():
        result["cuda_kernels"] = cuda_kernel_choices()
    if cuda_device:
        result["auto_cuda"] = resolve_backend("auto", torch.empty(0, device="cuda"))
        result["auto_cuda_channels_last"] = resolve_backend(
            "auto", torch.empty(1, 2, 2, 2, device="cuda").contiguous(
                memory_format=torch.channels_last))
    return result


def _runtime_text(state, detail):
    if state is None:
        return None  # no extension loaded
    return {"shared": "shared", "unknown": f"unknown ({detail})"}.get(state, detail)


def cuda_kernel_choices():
    """The CUDA kernels the SFICONV_CUDA_* environment variables choose now, as the extension
    reads them ("nchw_kernel=...;tile_min_blocks=...;fused_backward=..."), or why they are
    invalid (every CUDA MCSConv call would then raise that error)."""
    try:
        return torch.ops.sficonv_ext.cuda_kernel_config()
    except RuntimeError as error:
        return f"invalid: {str(error).splitlines()[0]}"
