"""The models bench_models.py compares, each with the settings it runs under.

Every variant holds the same weights (loaded from one published-layout reference). A variant
says its model, whether it trains, its autocast dtype and whether it is compiled:

- ``reference``: the published code as published: eager, float32, NCHW (the baseline).
- ``reference-amp-cl``: the published code with channels_last weights and inputs and autocast
  in the run's dtype (on a float32 run: channels_last alone).
- ``reference-compiled``: ``torch.compile`` of ``reference-amp-cl``.
- ``fast`` / ``fast-nchw`` / ``fast-compiled``: the fused SFIConv-ResNet (channels_last by
  default), under autocast in the run's dtype. ``fast-triton``: the same with every Triton
  fusion forced (BatchNorm + add + ReLU epilogues, fused first layer), which ``"auto"`` leaves
  off where an H100 measured them slower, to track what they bring. ``fast-cpp-epilogue``:
  the same with the C++ BatchNorm + add + ReLU epilogue forced (CPU only; ``"auto"`` takes it in
  float32 CPU training, see ``sficonv_ext/ops/norm_act.py``); ``fast-torch-epilogue`` with
  PyTorch's BatchNorm, add and ReLU forced (the CPU default until 2026-11-27).
  ``fast-torch-conv``: the same with PyTorch's 3x3 convolutions forced (``"auto"`` takes the
  Winograd kernels for float32 CPU calls, see ``sficonv_ext/ops/conv3x3.py``).
  ``fast-torch-pointwise``: the same with PyTorch's 1x1 convolutions forced (``"auto"`` takes
  one matrix product for float32 CPU calls with few rows, see ``sficonv_ext/ops/conv1x1.py``).
- ``plain`` / ``plain-compiled``: the same network with the MCSConv removed and the first
  SFIConv layer as one ordinary convolution, and PyTorch's own convolutions, BatchNorm, add and
  ReLU: a plain CNN with exactly the fast model's layer shapes, the speed an SFIConv network
  should approach.
- ``fused-inference``: ``fuse_for_inference(fast, cudnn=False)`` (inference only; on the CPU
  its convolutions run with the residual add as a oneDNN post-op on pre-reordered weights, on
  CUDA as plain ``F.conv2d`` calls: the library's CUDA default is ``fused-inference-cudnn``);
  ``fused-inference-unpacked`` the same with plain ``F.conv2d`` calls (``onednn=False``);
  ``fused-inference-no-winograd`` the oneDNN layers with the 3x3 convolutions on oneDNN too
  (``winograd=False``; by default the CPU runs them as Winograd F(4x4, 3x3));
  ``fused-inference-compiled`` the same under ``torch.compile``; ``fused-inference-frozen``
  under ``torch.compile`` with inductor's freezing (weights as constants: oneDNN prepacking and
  convolution post-op fusion on the CPU);
  ``fused-inference-cudagraph`` the same replayed from a CUDA graph (CUDA only);
  ``fused-inference-lowp`` with the folded weights cast once to the run's autocast dtype (no
  cast per call; on a float32 run the same as ``fused-inference``);
  ``fused-inference-cudnn`` with ``cudnn=True`` (each convolution + bias + add + ReLU as one
  fused cuDNN call, CUDA only; what ``fuse_for_inference`` does by default on CUDA) and
  ``fused-inference-cudnn-cudagraph`` that replayed from a CUDA graph.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sficonv_ext import models, reference
from sficonv_ext.nn import FirstSFIConv2d

VARIANTS = ("reference", "reference-amp-cl", "reference-compiled", "fast", "fast-triton",
            "fast-cpp-epilogue", "fast-torch-epilogue", "fast-torch-conv", "fast-torch-pointwise",
            "fast-nchw", "fast-compiled", "plain", "plain-compiled", "fused-inference",
            "fused-inference-unpacked", "fused-inference-no-winograd", "fused-inference-compiled",
            "fused-inference-frozen", "fused-inference-cudagraph", "fused-inference-lowp",
            "fused-inference-cudnn", "fused-inference-cudnn-cudagraph")
DEFAULT_VARIANTS = {
    "cpu": ("reference", "reference-amp-cl", "fast", "fast-torch-epilogue", "fast-torch-conv",
            "fast-torch-pointwise", "fast-nchw", "plain", "fused-inference",
            "fused-inference-no-winograd", "fused-inference-unpacked"),
    "cuda": ("reference", "reference-amp-cl", "fast", "fast-triton", "plain", "fused-inference",
             "fused-inference-cudnn", "fused-inference-cudagraph"),
}


class PlainFirstConv(nn.Module):
    """FirstSFIConv2d without its MCSConv: one convolution with the same weight shape."""

    def __init__(self, first):
        super().__init__()
        self.weight, self.stride = first.weight, first.stride
        self.padding = first.kernel_size // 2

    def forward(self, x):
        if self.stride == 2:
            x = F.avg_pool2d(x, 2)
        return F.conv2d(x, self.weight, padding=self.padding)


def plain_twin(fast_model):
    """A copy of ``fast_model`` that is an ordinary CNN of the same layer shapes (PyTorch's
    convolutions, BatchNorm, add and ReLU, as any CNN runs them)."""
    plain = models.set_norm_backend(copy.deepcopy(fast_model), "torch")
    models.set_conv_backend(plain, "torch")
    models.set_pointwise_backend(plain, "torch")
    for module in list(plain.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FirstSFIConv2d):
                setattr(module, name, PlainFirstConv(child))
    return plain


def all_triton(model):
    """``model`` with every Triton fusion forced on (CUDA only)."""
    models.set_norm_backend(model, "triton")
    for module in model.modules():
        if isinstance(module, FirstSFIConv2d):
            module.backend = "triton"
    return model


@dataclass
class Variant:
    name: str
    model: nn.Module
    trainable: bool
    amp_dtype: torch.dtype = None   # None: no autocast
    channels_last_input: bool = False


def build_variants(names, depth, device, amp_dtype):
    """name -> Variant, in the order given, or name -> error text for one that could not be
    built. ``amp_dtype`` is the run's autocast dtype (None for a float32 run); the
    ``reference`` baseline always runs in float32."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.manual_seed(0)
    ref = reference.PublishedTrainingWrapper(depth).to(device)
    state = ref.state_dict()
    build = getattr(models, f"sfi_resnet{depth}")

    def fast(channels_last=True):
        model = build(channels_last=channels_last).to(device)
        model.load_state_dict(state)
        return model

    def reference_cl():
        model = copy.deepcopy(ref).to(memory_format=torch.channels_last)
        return model

    makers = {
        "reference": lambda: Variant("reference", ref, True),
        "reference-amp-cl": lambda: Variant("reference-amp-cl", reference_cl(), True, amp_dtype,
                                            True),
        "reference-compiled": lambda: Variant("reference-compiled",
                                              torch.compile(reference_cl()), True, amp_dtype,
                                              True),
        "fast": lambda: Variant("fast", fast(), True, amp_dtype),
        "fast-triton": lambda: Variant("fast-triton", all_triton(fast()), True, amp_dtype),
        "fast-cpp-epilogue": lambda: Variant("fast-cpp-epilogue",
                                             models.set_norm_backend(fast(), "cpp"), True,
                                             amp_dtype),
        "fast-torch-epilogue": lambda: Variant("fast-torch-epilogue",
                                               models.set_norm_backend(fast(), "torch"), True,
                                               amp_dtype),
        "fast-torch-conv": lambda: Variant("fast-torch-conv",
                                           models.set_conv_backend(fast(), "torch"), True,
                                           amp_dtype),
        "fast-torch-pointwise": lambda: Variant("fast-torch-pointwise",
                                                models.set_pointwise_backend(fast(), "torch"),
                                                True, amp_dtype),
        "fast-nchw": lambda: Variant("fast-nchw", fast(channels_last=False), True, amp_dtype),
        "fast-compiled": lambda: Variant("fast-compiled", torch.compile(fast()), True,
                                         amp_dtype),
        "plain": lambda: Variant("plain", plain_twin(fast()), True, amp_dtype),
        "plain-compiled": lambda: Variant("plain-compiled", torch.compile(plain_twin(fast())),
                                          True, amp_dtype),
        "fused-inference": lambda: Variant(
            "fused-inference", models.fuse_for_inference(fast(), cudnn=False), False, amp_dtype),
        "fused-inference-unpacked": lambda: Variant(
            "fused-inference-unpacked",
            models.fuse_for_inference(fast(), onednn=False, cudnn=False), False,
            amp_dtype),
        "fused-inference-no-winograd": lambda: Variant(
            "fused-inference-no-winograd",
            models.fuse_for_inference(fast(), cudnn=False, winograd=False), False, amp_dtype),
        "fused-inference-compiled": lambda: Variant(
            "fused-inference-compiled",
            torch.compile(models.fuse_for_inference(fast(), cudnn=False)), False,
            amp_dtype),
        "fused-inference-frozen": lambda: Variant(
            "fused-inference-frozen",
            torch.compile(models.fuse_for_inference(fast(), cudnn=False),
                          options={"freezing": True}), False,
            amp_dtype),
        "fused-inference-cudagraph": lambda: Variant(
            "fused-inference-cudagraph",
            models.fuse_for_inference(fast(), cuda_graph=True, cudnn=False),
            False, amp_dtype),
        "fused-inference-lowp": lambda: Variant(
            "fused-inference-lowp",
            models.fuse_for_inference(fast(), cudnn=False).to(amp_dtype or torch.float32), False,
            amp_dtype),
        "fused-inference-cudnn": lambda: Variant(
            "fused-inference-cudnn", models.fuse_for_inference(fast(), cudnn=True), False,
            amp_dtype),
        "fused-inference-cudnn-cudagraph": lambda: Variant(
            "fused-inference-cudnn-cudagraph",
            models.fuse_for_inference(fast(), cuda_graph=True, cudnn=True), False, amp_dtype),
    }
    built = {}
    for name in names:
        try:
            built[name] = makers[name]()
        except Exception as error:  # noqa: BLE001  (reported by the benchmark, not fatal)
            built[name] = f"{type(error).__name__}: {error}"[:300]
    return built
