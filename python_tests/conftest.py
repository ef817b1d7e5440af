"""Shared helpers: fast/reference model pairs and a relative-error measure."""
import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; this must be set before triton
# is first imported (sficonv_ext imports it lazily, on the first Triton call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sficonv_ext import models, reference  # noqa: E402


def rel_err(a, b):
    """Max absolute difference divided by the max magnitude of the reference ``b``."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def make_pair(depth, dtype=torch.float64, layout="wrapper"):
    """A published model and a fast model holding the same weights."""
    ref = (reference.PublishedTrainingWrapper(depth) if layout == "wrapper"
           else reference.SFIConvResNet(reference.DEPTHS[depth])).to(dtype)
    # Random BatchNorm statistics and affine terms, so eval mode is not an identity.
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    fast = getattr(models, f"sfi_resnet{depth}")().to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast
