"""``fuse_for_inference``: an eval-only copy with every BatchNorm folded into its convolution."""
import copy
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import MCSConv2d, SFIConvNorm
from ..ops.ad_modes import functorch_transform_active
from .cuda_graph import CUDAGraphInference
from .cudnn_inference import cudnn_fusion_available, use_cudnn_layers
from .onednn_inference import (onednn_fusion_available, residuals_may_be_overwritten,
                               use_onednn_layers)
from .resnet import PlainBottleneck, SFIResNet


@torch.no_grad()
def _fold(conv, bn):
    """Fold eval-mode ``bn`` into ``conv`` (in place): y = scale * conv(x) + shift.

    Computed in float64 (float32 on MPS) and stored in the convolution's dtype: a BatchNorm
    kept in float32 beside bfloat16 convolutions must not turn the folded weights into
    float32."""
    if isinstance(bn, nn.Identity):
        raise ValueError("found an nn.Identity where a BatchNorm should be: this network is "
                         "fused for inference already")
    if not isinstance(bn, _BatchNorm):
        raise ValueError(f"expected a BatchNorm to fold, found {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm2d without running statistics (track_running_stats=False) "
                         "normalises with batch statistics in eval mode too: it cannot be "
                         "folded into its convolution")
    dtype = conv.weight.dtype
    # float64 where the device has it (MPS has not).
    wide = torch.float32 if conv.weight.device.type == "mps" else torch.float64
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    shift = -bn.running_mean.to(wide) * scale
    if bn.affine:
        scale, shift = scale * bn.weight.to(wide), shift * bn.weight.to(wide) + bn.bias.to(wide)
    if conv.bias is not None:
        shift = shift + conv.bias.to(wide) * scale
    weight = conv.weight.to(wide) * scale.view(-1, 1, 1, 1)
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=False)


def _bake_mcs(mcs):
    # A learnable filter is re-constrained every forward; for inference compute it once.
    with torch.no_grad():
        mcs.weight = nn.Parameter(mcs.effective_weight().detach().clone(), requires_grad=False)
    mcs.learnable = False


def _on_cpu(net):
    return all(p.device.type == "cpu" for p in net.parameters())


def _strip_prefix(state_dict, prefix):
    stripped = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # module versions, keyed by module path
        stripped._metadata = OrderedDict((k[len(prefix):] if k.startswith(prefix) else "", v)
                                         for k, v in metadata.items()
                                         if k.startswith(prefix) or k == prefix[:-1])
    return stripped


class FusedForInference(nn.Module):
    """Eval-only SFIConv-ResNet with BatchNorm folded away, running in channels_last."""

    fused_for_inference = True

    def __init__(self, network):
        super().__init__()
        self.network = network

    def train(self, mode=True):
        if mode:
            raise RuntimeError("a model from fuse_for_inference is eval-only (its BatchNorms are "
                               "folded into the convolutions); train the original model instead")
        return super().train(False)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load this model's state_dict (``network.*`` keys) or its network's, through the
        network's checks: a checkpoint of an unfused model is refused before anything is
        copied (its weights are not folded)."""
        # The network: "network", or "network.network" inside a CUDA-graph wrapper; a
        # state_dict may carry either path (saved with or without that wrapper) or none.
        name, net = next((n, m) for n, m in self.named_modules() if isinstance(m, SFIResNet))
        if isinstance(state_dict, Mapping) and state_dict and all(
                isinstance(k, str) for k in state_dict):
            parts = name.split(".")
            for prefix in (".".join(parts[i:]) + "." for i in range(len(parts))):
                if all(k.startswith(prefix) for k in state_dict):
                    state_dict = _strip_prefix(state_dict, prefix)
                    break
        return net.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x):
        # Only a dense 4-D tensor is converted: the network's own checks name what is wrong
        # with anything else (sparse, nested, wrong rank).
        if (isinstance(x, torch.Tensor) and not x.is_nested and x.layout == torch.strided
                and x.dim() == 4 and not functorch_transform_active()):
            x = x.contiguous(memory_format=torch.channels_last)
        if torch.compiler.is_compiling():
            return self.network(x)  # the oneDNN layers stand aside there anyway
        with residuals_may_be_overwritten(self.network):
            return self.network(x)


def fuse_for_inference(model, cuda_graph=False, onednn=True, cudnn=None, winograd=True):
    """Return an eval-only copy of ``model`` with BatchNorm folded into the convolutions and
    weights in channels_last; same outputs as ``model.eval()`` within float32 rounding.

    ``onednn=True`` (a CPU model, where torch has oneDNN): the folded convolutions run with
    their residual add as one oneDNN call on a pre-reordered weight, the ReLU in place after it
    (see ``sficonv_ext.models.onednn_inference``); ``False`` keeps plain ``F.conv2d`` calls.
    With it, ``winograd=True`` runs the 3x3 convolutions (maps of at least 8 pixels a side) as
    Winograd F(4x4, 3x3) on weight tiles transformed once, with bias and ReLU in its output
    pass (``sficonv_ext.ops.conv3x3``); ``False`` leaves them to oneDNN.

    ``cudnn=True`` (a CUDA model): each folded convolution followed by a ReLU runs with its
    bias, residual add and ReLU as one fused cuDNN call, on weights cast once to the compute
    dtype (see ``sficonv_ext.models.cudnn_inference``); ``None`` (the default) means True for a
    model on a CUDA device where torch has those ops (measured 1.39x and 1.49x the plain folded
    model's eager inference on an H200 and an H100, bfloat16, batch 64), False elsewhere. Under
    ``torch.compile`` those layers stand aside for the plain path, which the compiler fuses.

    ``cuda_graph=True`` (model on a CUDA device): the copy captures its forward in a CUDA graph
    on the first call and replays it afterwards; it then accepts only that call's input shape,
    dtype and autocast setting (anything else raises ``ValueError``)."""
    if not isinstance(model, SFIResNet):
        raise TypeError(f"fuse_for_inference expects an SFIResNet from sficonv_ext.models, "
                        f"got {type(model).__name__}")
    # Normal tensors even when called under inference_mode: weights made there carry no
    # version counter, so the oneDNN layers could not cache their reordered copies.
    with torch.inference_mode(False):
        return _fuse(model, cuda_graph, onednn, cudnn, winograd)


def _fuse(model, cuda_graph, onednn, cudnn, winograd):
    device = next(model.parameters()).device
    for option, asked in (("cudnn", cudnn), ("cuda_graph", cuda_graph)):
        if asked and device.type != "cuda":
            raise ValueError(f"{option}=True needs the model on a CUDA device; it is on {device}")
    if cudnn is None:
        cudnn = device.type == "cuda" and cudnn_fusion_available()
    if cudnn and not cudnn_fusion_available():
        raise RuntimeError("cudnn=True needs cuDNN and torch's fused cuDNN convolution ops "
                           "(torch.cudnn_convolution_relu), which this torch build lacks")
    if getattr(model, "fused_for_inference", False):
        raise ValueError("this network is fused for inference already (it is a "
                         "fuse_for_inference(...).network); fuse the original model")
    net = copy.deepcopy(model).eval()
    # Marks the inner network too (users reach it as fused.network): checkpoint export and
    # fusing again refuse it.
    net.fused_for_inference = True
    _fold(net.conv1, net.bn1)
    net.bn1 = nn.Identity()
    for module in list(net.modules()):
        if isinstance(module, SFIConvNorm):
            _fold(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, PlainBottleneck):
            for i in (1, 2, 3):
                _fold(getattr(module, f"conv{i}"), getattr(module, f"bn{i}"))
                setattr(module, f"bn{i}", nn.Identity())
        elif isinstance(module, MCSConv2d):
            _bake_mcs(module)
    for p in net.parameters():
        p.requires_grad_(False)
    if onednn and _on_cpu(net) and onednn_fusion_available():
        use_onednn_layers(net, winograd=winograd)
    if cudnn:
        use_cudnn_layers(net)
    net = net.to(memory_format=torch.channels_last)
    fused = FusedForInference(net).eval()
    if cuda_graph:
        fused.network = CUDAGraphInference(net).eval()
    return fused
