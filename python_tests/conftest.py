"""Shared helpers: fast/reference model pairs and a relative-error measure."""
import collections
import importlib.util
import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; this must be set before triton
# is first imported (sficonv_ext imports it lazily, on the first Triton call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sficonv_ext import models, ops, reference  # noqa: E402
from sficonv_ext.ops import _extension  # noqa: E402


def pytest_sessionstart(session):
    # `make test` (and so CI) and scripts/gpu_check.sh set these: without them a build whose
    # binary does not load would skip every kernel test and the run would still pass.
    if os.environ.get("SFICONV_REQUIRE_EXTENSION") == "1" and not _extension.has_cpp_kernels():
        pytest.exit(f"SFICONV_REQUIRE_EXTENSION=1 but the compiled extension is not loaded: "
                    f"{_extension.LOAD_ERROR or 'sficonv_ext._C was not built'}", returncode=3)
    if os.environ.get("SFICONV_REQUIRE_EXTENSION") == "1" and importlib.util.find_spec("triton"):
        # Likewise the Triton ops: with Triton installed but failing to import, every Triton
        # test would skip.
        info = ops.backends()
        if not info["triton_ops"]:
            pytest.exit(f"SFICONV_REQUIRE_EXTENSION=1 and Triton is installed, but the Triton "
                        f"ops did not load: {info['triton_error']}", returncode=3)
    if os.environ.get("SFICONV_REQUIRE_CUDA") == "1" and not _extension.has_cuda_kernels():
        pytest.exit("SFICONV_REQUIRE_CUDA=1 but the extension has no CUDA kernels "
                    f"({_extension.LOAD_ERROR or 'built without them'})", returncode=3)


def rel_err(a, b):
    """Max absolute difference divided by the max magnitude of the reference ``b``."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def laid_out(t, kind):
    """``t`` laid out as ``kind``: "nchw", "channels_last", or "strided" (a non-contiguous view
    of a tensor twice as wide)."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def conv_weight(k, c, size, dtype, kind):
    """A random ``[k, c, size, size]`` weight laid out as ``kind``: "contiguous",
    "channels_last", or "strided" (every other input channel of a tensor twice as wide)."""
    w = torch.randn(k, c, size, size, dtype=torch.float64).to(dtype)
    if kind == "channels_last":
        return w.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return torch.randn(k, 2 * c, size, size, dtype=dtype)[:, ::2].copy_(w)
    return w


def fresh_leaf(t):
    """A copy of ``t`` that requires grad, with ``t``'s strides even where ``t`` is a non-dense
    view: ``clone`` makes such a view contiguous, which had turned the tests' "strided" inputs
    into plain NCHW ones. The gaps of the copy's storage stay unwritten (a kernel that read
    them would show it)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out.requires_grad_()


def worst_channel_rel_err(a, b, dim=1):
    """``rel_err`` of each channel (slices along ``dim``: 1 for activations, 0 for a depthwise
    weight), the largest: a channel of large values cannot hide another channel's error."""
    a, b = a.movedim(dim, 0).flatten(1), b.movedim(dim, 0).flatten(1)
    if b.shape[1] == 0:
        return 0.0
    scale = b.abs().amax(1).clamp_min(1e-300)
    return ((a - b).abs().amax(1) / scale).max().item()


def signed_mcs_weights(channels, k, dtype=torch.float32, device="cpu"):
    """Random ``[channels, 1, k, k]`` MCSConv taps of both signs (k >= 3) whose off-centre sum,
    the constraint's divisor, is at least 1 in magnitude: a low-precision result then measures
    the kernel, not the conditioning of a near-zero divisor (tested on its own elsewhere)."""
    w = torch.randn(channels, 1, k, k, dtype=torch.float64)
    off_centre = w.sum(dim=(1, 2, 3)) - w[:, 0, k // 2, k // 2]
    w[:, 0, 0, 0] += torch.where(off_centre >= 0, 1.0, -1.0)
    return w.to(dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def randomise_batchnorms(model):
    """Random statistics and affine terms in every BatchNorm of ``model``: eval mode is then no
    identity, and a branch normalised by another branch's BatchNorm changes the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)


def make_pair(depth, dtype=torch.float64, layout="wrapper"):
    """A published model and a fast model holding the same weights."""
    ref = (reference.PublishedTrainingWrapper(depth) if layout == "wrapper"
           else reference.SFIConvResNet(reference.DEPTHS[depth])).to(dtype)
    randomise_batchnorms(ref)
    fast = getattr(models, f"sfi_resnet{depth}")().to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def make_bn(c, momentum=0.1, dtype=torch.float32, device="cpu"):
    """A training-mode BatchNorm2d with random affine terms and running statistics."""
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(device=device, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def epilogue_step(bn, x, residual, relu, grad, backend):
    """``ops.batch_norm_act`` once in training mode: its output, the gradients of x, weight,
    bias (and residual) for ``grad``, and the running statistics afterwards."""
    x = fresh_leaf(x)
    residual = fresh_leaf(residual) if residual is not None else None
    y = ops.batch_norm_act(x, bn, residual, relu, backend=backend)
    inputs = [x, bn.weight, bn.bias] + ([residual] if residual is not None else [])
    grads = torch.autograd.grad(y, inputs, grad.to(y.dtype))
    return [y, *grads, bn.running_mean.clone(), bn.running_var.clone(),
            bn.num_batches_tracked.clone()]


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen and custom ops dispatched inside the block, by overload packet name
    (``"aten.add"``, ``"sficonv_ext.batch_norm_act_forward"``)."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))
