"""MCSConv2d: the constrained depthwise filter of the frequency branch (SPEC section 1)."""
import torch
import torch.nn as nn

from ..ops import BACKENDS, mcs_conv
from ..reference.constraint import constrain_mcs_weight

MCS_INITS = ("published", "stable")


def published_mcs_init(channels, kernel_size=5, generator=None, dtype=torch.float32):
    """The published initialisation: ``N(0, 1)`` taps divided by their off-centre sum, centre -1.

    Nothing guards a sum near zero, so taps of 100 and more occur; kept for parity.
    """
    raw = torch.randn(channels, 1, kernel_size, kernel_size, generator=generator, dtype=dtype)
    c = kernel_size // 2
    raw[:, :, c, c] = 0
    raw = raw / raw.sum(dim=(1, 2, 3), keepdim=True)
    raw[:, :, c, c] = -1
    return raw


def stable_mcs_init(channels, kernel_size=5, generator=None, dtype=torch.float32):
    """A bounded initialisation: positive off-centre taps summing to exactly 1, centre -1.

    Every ``S_c`` is 1, so no filter starts near the clamp and no tap exceeds 1.
    """
    raw = torch.rand(channels, 1, kernel_size, kernel_size, generator=generator, dtype=dtype)
    raw = raw + 0.5  # keeps every tap well away from 0
    c = kernel_size // 2
    raw[:, :, c, c] = 0
    raw = raw / raw.sum(dim=(1, 2, 3), keepdim=True)
    raw[:, :, c, c] = -1
    return raw


class MCSConv2d(nn.Module):
    """Depthwise ``k x k`` constrained convolution, stride 1, padding ``k // 2``, no bias.

    ``learnable=False`` (default, published behaviour): ``weight`` holds the constrained filter
    and is frozen. ``learnable=True``: ``weight`` is a raw parameter and the constraint is applied
    in every forward as a differentiable reparametrisation, so training moves the filter.
    ``published_bias`` is the published module's unused random ``bias``; it is kept only so that
    published checkpoints round-trip exactly, and never enters the computation.
    ``backend`` picks the kernel (see :func:`sficonv_ext.ops.mcs_conv`); it is not saved.
    """

    def __init__(self, channels, kernel_size=5, learnable=False, init="published", eps=1e-6,
                 backend="auto"):
        super().__init__()
        if channels < 1:
            raise ValueError(f"MCSConv2d needs at least one channel, got {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"MCSConv2d kernel_size must be odd and positive, got {kernel_size}")
        if init not in MCS_INITS:
            raise ValueError(f"MCSConv2d init must be one of {MCS_INITS}, got {init!r}")
        if not eps > 0:
            raise ValueError(f"MCSConv2d eps must be positive, got {eps}")
        if backend not in BACKENDS:
            raise ValueError(f"MCSConv2d backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.channels = channels
        self.kernel_size = kernel_size
        self.learnable = learnable
        self.eps = eps
        make = published_mcs_init if init == "published" else stable_mcs_init
        self.weight = nn.Parameter(make(channels, kernel_size), requires_grad=learnable)
        self.register_buffer("published_bias", torch.zeros(channels))

    def effective_weight(self):
        """The filter forward applies: constrained on the fly in learnable mode."""
        if self.learnable:
            return constrain_mcs_weight(self.weight, self.eps)
        return self.weight

    def forward(self, x):
        # Learnable: the raw weight goes in and the kernel applies the constraint itself.
        return mcs_conv(x, self.weight, constrained=self.learnable, eps=self.eps,
                        backend=self.backend)

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, learnable={self.learnable}, "
                f"eps={self.eps}, backend={self.backend!r}")
